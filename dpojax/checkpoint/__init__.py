"""The training checkpoint: Orbax state, data iterator and keep-best (conversion: dpojax.formats)."""
