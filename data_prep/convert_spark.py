r"""Convert JSON Lines / JSON, parquet or text files (local or s3://) into MDS shards of packed tokens on Apache
Spark; the samples are those of the single-machine converters, sample for sample. Needs Java 17 and
pip install 'mpt-forge[spark]'. docs/SPARK.md has the details and a cluster example.

On this machine (local[*]: every core):

    python data_prep/convert_spark.py data/*.jsonl --out_root /data/mds/mydata --concat_tokens 2048

On a Spark cluster (mpt-forge installed on every node, or shipped with --py-files):

    spark-submit --master spark://head:7077 data_prep/convert_spark.py s3://corpus/c4/en/ \
        --out_root s3://bucket/mds/c4 --tokenizer EleutherAI/gpt-neox-20b --partitions 2048
"""
import argparse
import sys

from llmfoundry.data import DataError
from llmfoundry.data.convert import add_convert_args, config_from_args, run_cli
from llmfoundry.data.spark import SparkSetupError, SparkTaskError, convert_on_spark, open_inputs


def spark_conf(pairs) -> dict[str, str]:
    conf = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"--conf {pair}: expected KEY=VALUE, e.g. --conf spark.driver.memory=4g")
        conf[key] = value
    return conf


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+",
                        help="files, folders, glob patterns or s3:// (s3a://) URLs of objects, prefixes or patterns")
    parser.add_argument("--format", choices=["json", "parquet", "text"], default=None,
                        help="json (JSON Lines or JSON lists, .gz too), parquet, or text (one document per file); "
                             "default: json or parquet, from the file names")
    parser.add_argument("--text_field", default="text", help="the JSON field / parquet column holding the text")
    parser.add_argument("--extensions", nargs="*", default=None,
                        help="--format text: only take files with these endings from folders (e.g. .py .txt)")
    parser.add_argument("--decode_errors", choices=["strict", "replace"], default="strict",
                        help="what to do with bytes that are not UTF-8 (default: stop with an error)")
    add_convert_args(parser)
    parser.add_argument("--master", default=None,
                        help="Spark master URL (default: local[*], every core here; under spark-submit, its "
                             "--master)")
    parser.add_argument("--partitions", type=int, default=None,
                        help="Spark tasks, each converting a contiguous range of the input's slices, in input "
                             "order; the samples are the same for any number (default: up to 4 per core, at most "
                             "one per slice)")
    parser.add_argument("--conf", action="append", metavar="KEY=VALUE",
                        help="a Spark setting for a session started here, e.g. --conf spark.driver.memory=4g "
                             "(repeat for more; under spark-submit pass them to spark-submit)")
    args = parser.parse_args(argv)
    if args.processes != 1:
        raise DataError("--processes is the single-machine converters' flag; on Spark pass --partitions N (the "
                        "samples are those of --processes N)")
    source = open_inputs(args.inputs, args.format, text_field=args.text_field, decode_errors=args.decode_errors,
                         extensions=args.extensions)
    return convert_on_spark(source, config_from_args(args), partitions=args.partitions, master=args.master,
                            spark_conf=spark_conf(args.conf))


def run(argv=None):
    """``main``; Spark that cannot run here (Java, pyspark) or a failed task: one ``error:`` line (after the task's
    Python traceback, if it has one), exit status 1."""
    try:
        return main(argv)
    except (SparkSetupError, SparkTaskError) as e:
        if getattr(e, "traceback", ""):
            print(e.traceback, file=sys.stderr)
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(run)
