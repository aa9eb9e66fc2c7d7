"""Config of a causal LM with parameters added by a kedit edit state (shipped with ``kedit export``).

Needs only transformers: the base architecture's config class plus one field, ``kedit_added``, which
says what was added where (method, module path, tensor shapes, and the method's settings).
"""

import transformers

BASE_CONFIG_CLASS = "LlamaConfig"  # kedit export writes the base architecture's config class here

_BaseConfig = getattr(transformers, BASE_CONFIG_CLASS)


class KeditAddedConfig(_BaseConfig):
    # its own model_type: without trust_remote_code transformers refuses the directory instead of
    # silently loading the base model without the edits
    model_type = "kedit_added"

    def __init__(self, kedit_added=None, **kwargs):
        self.kedit_added = dict(kedit_added or {})
        super().__init__(**kwargs)
