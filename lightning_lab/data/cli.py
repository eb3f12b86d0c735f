"""`lab data`: build pretraining data (corpus -> tokenizer -> packed token files).

    lab data corpus --seed 0 --train-lines 200000 --val-lines 2000 \\
        --train-out data/corpus/train.txt --val-out data/corpus/val.txt
    lab data tokenizer --input data/corpus/train.txt --model-prefix data/tokenizer/lab --vocab-size 512
    lab data pack --tokenizer data/tokenizer/lab --input data/corpus/train.txt --output data/packed/train.bin
    lab data pack --tokenizer data/tokenizer/lab --input data/corpus/val.txt --output data/packed/val.bin
    lab data discovery-tasks --seed 0 --out-train data/discover/train.jsonl --out-heldout data/discover/heldout.jsonl

Every input is checked and every output must not exist yet before any work starts: nothing already
written is overwritten, and a failed command leaves no partial file.
"""

from __future__ import annotations

from lightning_lab.data.corpus import DIFFICULTIES, TASK_FAMILIES, CorpusConfig, write_corpus
from lightning_lab.errors import (ArgumentParser, UserError, check_input_dir, check_input_file,
                                  check_new_output_dir, check_new_output_file)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lab data", description="Build pretraining data.")
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = CorpusConfig()
    corpus = commands.add_parser("corpus", help="synthetic task + prose corpus (train and val text files)")
    corpus.add_argument("--seed", type=int, default=defaults.seed)
    corpus.add_argument("--train-lines", type=int, default=defaults.train_lines)
    corpus.add_argument("--val-lines", type=int, default=defaults.val_lines)
    corpus.add_argument("--train-out", required=True)
    corpus.add_argument("--val-out", required=True)
    corpus.add_argument("--filler-fraction", type=float, default=defaults.filler_fraction,
                        help="share of prose lines (default %(default)s)")
    corpus.add_argument("--families", nargs="+", choices=TASK_FAMILIES, default=list(defaults.families),
                        help="task families to include (default: all)")
    corpus.add_argument("--difficulties", nargs="+", type=int, choices=DIFFICULTIES,
                        default=list(defaults.difficulties), help="difficulty levels to include (default: 1 2 3)")

    tokenizer = commands.add_parser("tokenizer", help="train a SentencePiece tokenizer, saved as a transformers dir")
    tokenizer.add_argument("--input", required=True, help="training text, one sentence per line")
    tokenizer.add_argument("--model-prefix", required=True,
                           help="writes PREFIX.model, PREFIX.vocab and the transformers directory PREFIX/")
    tokenizer.add_argument("--vocab-size", type=int, required=True)
    tokenizer.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tokenizer.add_argument("--character-coverage", type=float, default=0.9995)

    pack = commands.add_parser("pack", help="tokenize a text file into PATH.bin + PATH.bin.json")
    pack.add_argument("--tokenizer", required=True, help="tokenizer directory")
    pack.add_argument("--input", required=True, help="text file, one document per line")
    pack.add_argument("--output", required=True, help="packed token file (.bin); the header goes to OUTPUT.json")
    pack.add_argument("--append-eos", type=int, choices=(0, 1), default=1, help="EOS after each line (default 1)")

    tasks = commands.add_parser("discovery-tasks", help="train and held-out discovery tasks (JSONL; discover/tasks.py)")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--out-train", required=True)
    tasks.add_argument("--out-heldout", required=True)
    tasks.add_argument("--train-per-cell", type=int, default=4, help="train tasks per (family, difficulty)")
    tasks.add_argument("--heldout-per-cell", type=int, default=2, help="held-out tasks per (family, difficulty)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "corpus":
        train_out = check_new_output_file(args.train_out, "--train-out")
        if train_out.resolve() == check_new_output_file(args.val_out, "--val-out").resolve():
            raise UserError(f"--train-out and --val-out are the same file, {train_out}")
        config = CorpusConfig(seed=args.seed, train_lines=args.train_lines, val_lines=args.val_lines,
                              filler_fraction=args.filler_fraction, families=tuple(args.families),
                              difficulties=tuple(args.difficulties))
        paths = write_corpus(config, args.train_out, args.val_out)
        print(f"wrote {config.train_lines} lines to {paths['train']} and {config.val_lines} lines to {paths['val']}")
    elif args.command == "tokenizer":
        from lightning_lab.data.tokenizer import train_tokenizer

        check_input_file(args.input, "--input")
        if args.vocab_size < 1:
            raise UserError(f"--vocab-size must be a positive integer, got {args.vocab_size}")
        for suffix in (".model", ".vocab"):
            check_new_output_file(args.model_prefix + suffix, "--model-prefix")
        check_new_output_dir(args.model_prefix, "--model-prefix")
        directory = train_tokenizer(args.input, args.model_prefix, args.vocab_size, args.model_type,
                                    character_coverage=args.character_coverage)
        print(f"wrote {args.model_prefix}.model and the transformers tokenizer {directory}/")
    elif args.command == "discovery-tasks":
        from lightning_lab.discover.tasks import SplitConfig, write_task_files

        config = SplitConfig(seed=args.seed, train_per_cell=args.train_per_cell, heldout_per_cell=args.heldout_per_cell)
        counts = write_task_files(config, args.out_train, args.out_heldout)
        print(f"wrote {counts['train']} tasks to {args.out_train} and {counts['heldout']} to {args.out_heldout}")
    else:
        from lightning_lab.data.packed import header_path, pack

        check_input_dir(args.tokenizer, "--tokenizer")
        check_input_file(args.input, "--input")
        check_new_output_file(args.output, "--output")
        check_new_output_file(header_path(args.output), "--output")
        header = pack(args.tokenizer, args.input, args.output, append_eos=bool(args.append_eos))
        print(f"wrote {header['num_tokens']} {header['dtype']} tokens from {header['num_documents']} lines "
              f"to {args.output} (header {header_path(args.output)})")
    return 0
