"""Train an MPT model from a YAML config: ``python scripts/train.py yamls/tiny-cpu.yaml [key=value ...]``.

Multi-process / multi-node: ``composer [-n NPROC] [--world_size W --node_rank R --master_addr A --master_port P]
scripts/train.py CONFIG.yaml ...`` (see ``llmfoundry/train/train.py``). ``--help`` is answered here, before
torch and composer are imported.
"""
import sys

HELP = """\
usage: python scripts/train.py CONFIG.yaml [key=value ...]
       composer [-n NPROC] scripts/train.py CONFIG.yaml [key=value ...]

Train an MPT model from one YAML config. The first form runs one process (CPU or one GPU). composer's
launcher starts one process per GPU of this node (-n NPROC to choose; on CPU, -n 2 runs 2 processes over gloo).
Several nodes: run the same command on every node, with the launcher's
--world_size W --node_rank R --master_addr HOST --master_port PORT before scripts/train.py.

  python scripts/train.py yamls/tiny-cpu.yaml                  # a tiny model on CPU, bundled data
  composer -n 8 scripts/train.py yamls/mpt-1b.yaml variables.data_remote=s3://my-bucket/mds

Overrides: key=value arguments after the YAML, applied in order (the later wins). A dotted key reaches into
sections, a number indexes a list, and the value is read as YAML (1e-4 a float, null none, [1, 2] a list):

  python scripts/train.py yamls/tiny-cpu.yaml max_duration=200ba optimizer.lr=1e-3 optimizer.betas.1=0.98
  composer scripts/train.py yamls/mpt-1b.yaml fsdp=null save_folder=s3://my-bucket/ckpt/{run_name}  # DDP

Config keys: every YAML key, what it means and which code uses it is in the table at the top of
llmfoundry/train/config.py; the dataclasses below that table list each section's fields and defaults
(model: llmfoundry/models/mpt/config.py). Example configs: yamls/ (pretraining recipes), yamls/finetune/.
An unknown or misspelled key or a value of the wrong type stops the run before any work, naming the key.

With autoresume: true (as in yamls/), running the same command again resumes from the latest checkpoint.
Exit status: 0 done, 1 a config, data or training error (one message on stderr), 2 a bad command line,
75 preempted (SIGTERM: a checkpoint was saved after the current batch; the same command resumes there).
"""


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


if __name__ == "__main__":
    if wants_help(sys.argv[1:]):
        print(HELP, end="")
        sys.exit(0)
    from llmfoundry.train import main
    sys.exit(main())
