"""Miscellaneous utilities."""


class EasyDict(dict):
    """A dict whose items can also be read and written as attributes.

    `d.key` is `d['key']`; a missing key raises AttributeError (so `hasattr`,
    `getattr(d, k, default)` and pickling behave as for ordinary objects).
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None
