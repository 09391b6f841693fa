"""Where a run's metrics go: one small writer interface and its implementations (edges).

  base.py         Writer: write(step, split, metrics), write_samples(step, samples),
                  add_file(step, path), flush(step), close(step).
  policy.py       A write the storage refused (disk full, permissions) under
                  checkpoint.on_error: stop with one line naming the step and the last complete
                  checkpoint, or warn and continue. Checkpoints use it too.
  writers.py      Writers: the list the loop holds (it knows none by name); every writer's
                  failure is handled there, in one place. `open_writers` builds it from
                  logging.writers; `check_available` fails at start-up on a missing package.
  console.py, jsonl.py, tensorboard.py, wandb_run.py, mlflow_run.py: the writers.
  timing.py       Step time split into data wait / compute / checkpoint / eval / samples;
                  peak memory; the MFU denominator.
  samples.py      Greedy answers to fixed validation prompts at every evaluation.
"""
