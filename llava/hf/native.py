"""A mixin for the classes that ``import llava.hf`` registers with transformers' Auto classes."""

from __future__ import annotations


class RegisteredNatively:
    """Never saved as remote code.

    A converted checkpoint loaded with ``trust_remote_code=True`` gets these very classes from its
    loader stub; transformers would then mark them as remote code and copy their source files into
    every folder they are saved to. They need no copy: the package registers them.
    """

    @classmethod
    def register_for_auto_class(cls, auto_class=None) -> None:
        return None
