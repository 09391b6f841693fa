"""Command line: python -m dpojax.main --config=configs/dpo_gpt.py --workdir=DIR."""

from dpojax import hostmem

hostmem.retain_freed_memory()  # Before any import starts threads.

# pylint: disable=wrong-import-position
from absl import app, flags, logging
from ml_collections import config_flags

from dpojax.train import loop, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Orbax and Grain log every step at INFO; our own progress lines are printed.
  logging.set_verbosity(logging.WARNING)
  sharding.maybe_initialize_distributed(_CONFIG.value.distributed)
  loop.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
