"""Classify sentences with any model the pipeline wrote: a model folder (PyTorch: plain, pruned or 4-bit) or an
ONNX export (ONNX Runtime). Prints one line per sentence: label, probability of that label, the sentence.

Run:    python predict.py "a gorgeous, moving film" "flat and tedious"
        python predict.py --file reviews.txt              (one sentence per line)
        echo "a gorgeous film" | python predict.py        (stdin, one sentence per line)
        python predict.py --model models/student_model "..."            (any model folder: PyTorch)
        python predict.py --model models/pruned_quantized_final/onnx/model.onnx "..."   (an ONNX file)

Default model: the final model, models/pruned_quantized_final. A model folder that ships an ONNX int8 export
(onnx/model_int8.onnx, written by 9_quantize_pruned_model.py) runs that export on CPU machines: the fast CPU
artifact of the same model (see final_report.md, "Deployment artifacts"); `--pytorch` runs the folder itself.
Which artifact answered is printed to stderr.

Options: --model PATH, --file PATH, --pytorch, --threads N (0 = torch's default), --max-length N (128),
         --batch-size N (32).
"""

import argparse
import sys
from pathlib import Path

from common.paths import stage_dir

ONNX_DEFAULT = Path("onnx") / "model_int8.onnx"


class PredictError(ValueError):
    """A bad model path or input file; the message says what to do."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="predict.py", description="Classify sentences (label, probability).")
    parser.add_argument("sentences", nargs="*", help="sentences to classify (default: --file, else stdin)")
    parser.add_argument("--model", default="", help="a model folder or an .onnx file (default: the final model)")
    parser.add_argument("--file", default="", help="a text file with one sentence per line")
    parser.add_argument("--pytorch", action="store_true", help="run a model folder in PyTorch even if it ships ONNX")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence (longer is truncated)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.threads < 0 or args.max_length < 3 or args.batch_size < 1:
        raise PredictError("--threads >= 0, --max-length >= 3 and --batch-size >= 1, please")
    return args


def utf8_lines(data: bytes, source: str) -> list:
    """The lines of UTF-8 text (a leading byte-order mark dropped); other bytes are refused in one line."""
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise PredictError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start}): "
                           f"convert it to UTF-8") from None


def read_sentences(args, stdin=None) -> list:
    if args.sentences and args.file:
        raise PredictError("give sentences as arguments or --file, not both")
    if args.sentences:
        lines = args.sentences
    elif args.file:
        path = Path(args.file)
        if not path.is_file():
            raise PredictError(f"--file {path}: no such file (one sentence per line)")
        lines = utf8_lines(path.read_bytes(), f"--file {path}")
    else:
        stdin = stdin if stdin is not None else sys.stdin
        if stdin.isatty():
            raise PredictError("no sentences: pass them as arguments, with --file PATH, or on stdin")
        # the bytes, not the locale's decoding (which may pass bad bytes on as lone surrogates)
        buffer = getattr(stdin, "buffer", None)
        lines = utf8_lines(buffer.read(), "stdin") if buffer is not None else stdin.read().splitlines()
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise PredictError("no sentences to classify (empty input)")
    return sentences


def resolve_model(args):
    """(kind "onnx" | "pytorch", path): the ONNX file or model folder that will answer."""
    import torch

    path = Path(args.model) if args.model else stage_dir("pruned_quantized")
    if path.suffix == ".onnx":
        if not path.is_file():
            raise PredictError(f"--model {path}: no such ONNX file")
        return "onnx", path
    if not path.is_dir():
        hint = "run the pipeline first (make all)" if not args.model else "give a model folder or an .onnx file"
        raise PredictError(f"{path} does not exist: {hint}")
    if not (path / "config.json").is_file():
        raise PredictError(f"{path} is not a model folder (no config.json): give a folder under models/ or an "
                           f".onnx file")
    if not args.pytorch and (path / ONNX_DEFAULT).is_file() and not torch.cuda.is_available():
        return "onnx", path / ONNX_DEFAULT
    return "pytorch", path


def export_labels(folder: Path) -> dict:
    """{class index: label name} recorded in an ONNX folder's export.json ({} when absent)."""
    import json

    from common.export import MANIFEST

    try:
        labels = json.loads((folder / MANIFEST).read_text()).get("labels") or {}
    except (OSError, ValueError):
        return {}
    return {int(k): v for k, v in labels.items()}


def classify(kind: str, path: Path, sentences, threads: int, max_length: int, batch_size: int) -> list:
    """[(label, probability)] per sentence."""
    import torch

    from common.modeling import ID2LABEL, load_model, load_tokenizer

    folder = path.parent if kind == "onnx" else path
    if kind == "onnx":
        from common.export import ExportError, OnnxClassifier

        try:
            runner = OnnxClassifier(path, threads)
        except ExportError as err:
            raise PredictError(f"{err}: rerun 9_quantize_pruned_model.py, or use --pytorch") from None
        try:
            tokenizer = load_tokenizer(folder)
        except (OSError, ValueError) as err:
            raise PredictError(f"{folder} has no readable tokenizer next to {path.name} "
                               f"({str(err).splitlines()[0][:200]}): rerun 9_quantize_pruned_model.py") from None

        def logits_of(enc):
            return torch.from_numpy(runner.logits(enc["input_ids"], enc["attention_mask"]))

        labels = export_labels(folder)
    else:
        try:
            model = load_model(folder)
            tokenizer = load_tokenizer(folder)
        except Exception as err:  # a corrupt or foreign folder: one line, not a traceback
            raise PredictError(f"{folder} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                               ": rerun the stage that wrote it") from None

        def logits_of(enc):
            with torch.no_grad():
                return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()

        labels = dict(model.config.id2label)
    labels = labels or ID2LABEL
    out = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[start:start + batch_size], padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt")
        probs = torch.softmax(logits_of(enc), dim=-1)
        p, index = probs.max(-1)
        out += [(labels.get(int(i), str(int(i))), float(q)) for i, q in zip(index, p)]
    return out


def main(argv=None, stdin=None, stdout=None) -> list:
    import torch

    stdout = stdout or sys.stdout
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sentences = read_sentences(args, stdin)
    kind, path = resolve_model(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model: {path} ({'ONNX Runtime' if kind == 'onnx' else 'PyTorch'})", file=sys.stderr)
    results = classify(kind, path, sentences, args.threads, args.max_length, args.batch_size)
    for sentence, (label, prob) in zip(sentences, results):
        print(f"{label}\t{prob:.4f}\t{sentence}", file=stdout)
    return results


if __name__ == "__main__":
    try:
        main()
    except PredictError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
