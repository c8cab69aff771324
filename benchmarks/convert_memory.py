"""Peak memory of `blip2-jax convert` on a multi-GB checkpoint: from-hf then to-hf.

Writes a random Hugging Face BLIP-2 checkpoint of EVA ViT-g + BERT-base Q-Former + OPT-1.3b
sizes (about 2.4 B parameters; float16 on disk, as the published weights) in shards of
`--shard_gb`, then runs each conversion in a fresh child process and prints its peak RSS next to
the checkpoint size, the largest shard and the issue's bound 1.5 x largest shard + 1 GB, and as a
ratio to the reference measured in the same run: `transformers` loading the checkpoint
(`from_pretrained`, fp16) and writing it again (`save_pretrained`).

    python benchmarks/convert_memory.py --workdir /tmp/convert_bench [--shard_gb 2] [--keep]
"""
# Frameworks are imported inside the functions that use them (a child pays only for its own).
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB = 10**9


def _config():
    from blip2_jax.models import presets
    from blip2_jax.models.config import OPTConfig

    opt_1_3b = OPTConfig(vocab_size=50304, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                         num_attention_heads=32, max_position_embeddings=2048)
    return presets.get("opt2.7b").replace(text=opt_1_3b)


def write_source(directory: Path, shard_bytes: int) -> dict[str, int]:
    """The random float16 HF checkpoint (config.json, shards, index) and an OPT-sized tokenizer."""
    import numpy as np
    from tokenizers import Tokenizer, models

    import transformers
    from blip2_jax.models import blip2
    from blip2_jax.models import config as config_lib
    from blip2_jax.weights import hf_names
    from blip2_jax.weights import safetensors_io

    config = _config()
    shapes = hf_names.flat_shapes(blip2.abstract_params(config))
    table = hf_names.slots(shapes)
    plan = [(n, hf_names.hf_shape(s, shapes[s.path]), np.dtype(np.float16)) for n, s in table.items()]
    shards = safetensors_io.plan_shards(plan, shard_bytes)
    rng = np.random.default_rng(0)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    directory.mkdir(parents=True)
    for name, shard in zip(names, shards):
        safetensors_io.write_file(directory / name, shard, lambda n: rng.standard_normal(
            dict((t[0], t[1]) for t in shard)[n], np.float32).astype(np.float16) * np.float16(0.02))
    weight_map = {t[0]: n for n, shard in zip(names, shards) for t in shard}
    total = sum(t[2].itemsize * int(np.prod(t[1])) for t in plan)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config_lib.to_hf(config)))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, config.image_token_index)})  # <image> lands on 50265
    transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                         bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(directory)
    largest = max((directory / n).stat().st_size for n in names)
    return {"total": total, "largest": largest, "shards": len(names), "params": sum(
        int(np.prod(t[1])) for t in plan)}


def child(direction: str, src: str, out: str) -> None:
    """One conversion; prints its wall time and peak RSS as JSON."""
    from blip2_jax.convert import hf_export

    tick = time.perf_counter()
    if direction == "from-hf":
        hf_export.from_hf(src, out)
    elif direction == "to-hf":
        hf_export.to_hf(src, out, dtype="float16", max_shard_size="2GB")
    else:  # the reference: transformers loading the same checkpoint and writing it out again
        import torch
        import transformers

        model = transformers.Blip2ForConditionalGeneration.from_pretrained(src, dtype=torch.float16)
        model.save_pretrained(out, max_shard_size="2GB")
    seconds = time.perf_counter() - tick
    print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _run_child(direction: str, src: Path, out: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--child", direction, str(src), str(out)], check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def arguments(description: str, workdir: str) -> argparse.ArgumentParser:
    """The flags of the benchmarks on this checkpoint (this one and `load_memory.py`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", type=Path, default=Path(workdir))
    parser.add_argument("--shard_gb", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    return parser


def fresh_source(args: argparse.Namespace) -> dict[str, int]:
    """The random checkpoint written anew in `args.workdir`/hf (`write_source`), with its writing time."""
    shutil.rmtree(args.workdir, ignore_errors=True)
    tick = time.perf_counter()
    return dict(write_source(args.workdir / "hf", int(args.shard_gb * GB)), seconds=time.perf_counter() - tick)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "/tmp/convert_bench").parse_args()
    if args.child:
        child(*args.child)
        return
    from common import cpu_name

    source = fresh_source(args)
    print(f"device: CPU {cpu_name()}, source written in {source['seconds']:.0f} s: "
          f"{source['params'] / 1e9:.2f} B params, {source['total'] / GB:.2f} GB float16 in {source['shards']} "
          f"shards, largest {source['largest'] / GB:.2f} GB")
    bound = 1.5 * source["largest"] + GB
    rows, peaks = [], {}
    for direction, src, out in (("from-hf", args.workdir / "hf", args.workdir / "orbax"),
                                ("to-hf", args.workdir / "orbax", args.workdir / "back"),
                                ("transformers", args.workdir / "hf", args.workdir / "reference")):
        result = _run_child(direction, src, out)
        peaks[direction] = result["peak_rss"]
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        rows.append(f"  {direction:<12} {result['seconds']:7.0f} s  wrote {written / GB:6.2f} GB  peak RSS "
                    f"{result['peak_rss'] / GB:5.2f} GB = {result['peak_rss'] / source['total']:.2f} x checkpoint, "
                    f"{'within' if result['peak_rss'] <= bound else 'ABOVE'} bound {bound / GB:.2f} GB")
    print("\n".join(rows))
    print(f"peak RSS vs transformers' from_pretrained + save_pretrained of the same checkpoint (fp16): "
          f"from-hf {peaks['from-hf'] / peaks['transformers']:.2f}x, to-hf {peaks['to-hf'] / peaks['transformers']:.2f}x")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
