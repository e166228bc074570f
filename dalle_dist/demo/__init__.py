"""``dalle-dist demo``: the end-to-end run on the synthetic shapes set (docs/demo.md)."""
