r"""Convert finetuning examples (JSON Lines: prompt/response or chat messages) into MDS shards for
``train_loader: {name: finetune, remote: ..., local: ..., split: ...}`` (llmfoundry/data/finetune.py).

Each example becomes one sample, in input order, written to <out_root>/<split>: columns ``prompt`` and
``response`` (str), or ``messages`` (json: [{role, content}, ...]) for chat, with your field and role names
already mapped (--columns, --role_names). Every example is checked as the loader checks it (a malformed one
stops the conversion naming its file and line, or is skipped with --malformed skip). Nothing is tokenized: the
loader applies prompt_template, tokenizes, truncates and packs, so the batches equal those from the JSON Lines.

    python data_prep/convert_finetune_to_mds.py data/train.jsonl --out_root s3://bucket/sft --split train
    python data_prep/convert_finetune_to_mds.py sharegpt.jsonl --out_root /data/sft \
        --columns messages=conversations role=from content=value --role_names human=user gpt=assistant
"""
import argparse
import itertools

from llmfoundry.data import DataError
from llmfoundry.data.convert import ConvertConfig, join_out, run_cli, write_samples
from llmfoundry.data.finetune import FinetuneLoaderConfig, canonical_records, jsonl_files

PROMPT_RESPONSE = {"prompt": "str", "response": "str"}
CHAT = {"messages": "json"}


def pairs(items: list[str], flag: str) -> dict[str, str]:
    """['a=b', ...] -> {'a': 'b', ...}"""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise DataError(f"{flag} {item!r}: write OURS=YOURS pairs, e.g. {flag} prompt=instruction")
        out[key] = value
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="JSON Lines files or folders (their *.jsonl files, sorted)")
    parser.add_argument("--out_root", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--split", default="train",
                        help="subfolder of --out_root to write (default: train, the loader's default split; "
                             "'' for none)")
    parser.add_argument("--columns", nargs="*", default=[], metavar="OURS=YOURS",
                        help="field names of your data, e.g. prompt=instruction response=output, or "
                             "messages=conversations role=from content=value")
    parser.add_argument("--role_names", nargs="*", default=[], metavar="YOURS=ROLE",
                        help="role values of your data, e.g. human=user gpt=assistant")
    parser.add_argument("--format", choices=["auto", "prompt_response", "chat"], default="auto",
                        help="default auto: chat when the first example has the messages field")
    parser.add_argument("--malformed", choices=["error", "skip"], default="error",
                        help="a malformed example stops the conversion (default), or is left out and counted")
    parser.add_argument("--compression", default="zstd", help="shard compression: zstd (default), none, gz, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    try:  # the loader's own config: the same field mapping and checks
        cfg = FinetuneLoaderConfig(max_seq_len=2, min_prompt_tokens=0, min_response_tokens=1,
                                   data_files=args.inputs, columns=pairs(args.columns, "--columns"),
                                   role_names=pairs(args.role_names, "--role_names"), format=args.format,
                                   malformed=args.malformed)
    except ValueError as e:
        raise DataError(str(e)) from None
    records = canonical_records(cfg)
    first = next(records)
    out = join_out(args.out_root, args.split) if args.split else args.out_root
    convert_cfg = ConvertConfig(out_root=out, tokenize=False, compression=args.compression,
                                overwrite=args.overwrite, progress=not args.no_progress)
    return write_samples(itertools.chain([first], records), CHAT if "messages" in first else PROMPT_RESPONSE,
                         convert_cfg, inputs=jsonl_files(args.inputs), what="examples")


if __name__ == "__main__":
    run_cli(main)
