"""`blip2-jax convert from-hf|to-hf|from-lavis|to-lavis` and `data build`: the commands that turn
weights and data sets from one format into another. Each reads `--src` and writes `--out` (under a
temporary name, renamed when complete)."""
from __future__ import annotations

from absl import app, flags

from blip2_jax.cli.command import Command, define_out, define_src, define_tokenizer

_FORMS = {"hf": "a Hugging Face BLIP-2 directory or hub id", "lavis": "a LAVIS .pth",
          "ckpt": "a model checkpoint or training workdir (its latest step, or --step)"}


def _out_dtype(values: flags.FlagValues, default: str) -> None:
    flags.DEFINE_string("out_dtype", None, f"The dtype of the arrays written (default: {default}).",
                        flag_values=values)


def _step(values: flags.FlagValues) -> None:
    flags.DEFINE_integer("step", None, "The step of a training workdir to convert (default: the latest).",
                         flag_values=values)


def _from_hf_flags(values: flags.FlagValues, argv: list[str]) -> None:
    del argv
    define_src(values, _FORMS["hf"])
    define_out(values, "a model checkpoint directory")
    _out_dtype(values, "float32")
    flags.DEFINE_string("adapter", None, "A PEFT LoRA adapter directory for the model: the checkpoint holds its "
                        "adapters too.", flag_values=values)


def _to_hf_flags(values: flags.FlagValues, argv: list[str]) -> None:
    del argv
    define_src(values, _FORMS["ckpt"])
    _step(values)
    define_out(values, "a Hugging Face directory (safetensors, config.json and the tokenizer)")
    _out_dtype(values, "the checkpoint's")
    define_tokenizer(values, "the one shipped (default: the checkpoint's, or the run's data.tokenizer)")
    flags.DEFINE_string("max_shard_size", "5GB", "The largest safetensors shard.", flag_values=values)
    flags.DEFINE_boolean("merge_lora", False, "Fold LoRA adapters into the weights instead of writing them as a PEFT "
                         "adapter in OUT/adapter.", flag_values=values)


def _from_lavis_flags(values: flags.FlagValues, argv: list[str]) -> None:
    del argv
    define_src(values, _FORMS["lavis"])
    flags.DEFINE_string("model", None, "The model preset the checkpoint is (e.g. opt2.7b, flant5xl, itm_vit_g).",
                        flag_values=values)
    flags.DEFINE_string("vision", None, "eva_vit_g.pth, for checkpoints without the frozen ViT.",
                        flag_values=values)
    flags.DEFINE_string("text", None, "The LLM's Hugging Face directory or hub id, for checkpoints without the "
                        "frozen LLM.", flag_values=values)
    define_out(values, "a model checkpoint directory")
    _out_dtype(values, "float32")


def _to_lavis_flags(values: flags.FlagValues, argv: list[str]) -> None:
    del argv
    define_src(values, _FORMS["ckpt"])
    _step(values)
    define_out(values, "a LAVIS .pth")
    flags.DEFINE_string("vision_out", None, "Also write the ViT as eva_vit_g.pth here.", flag_values=values)
    _out_dtype(values, "the checkpoint's")


def _bytes_bar(total: int, what: str):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what)


def _from_hf(values: flags.FlagValues) -> None:
    from blip2_jax.convert import hf_export  # pylint: disable=import-outside-toplevel  # keep --help fast

    FROM_HF.require(values, "src", "out")
    with _bytes_bar(0, "from-hf") as bar:
        out = hf_export.from_hf(values.src, values.out, dtype=values.out_dtype, adapter=values.adapter,
                                progress=bar.update)
    _summary(values.out, out)


def _from_lavis(values: flags.FlagValues) -> None:
    # pylint: disable=import-outside-toplevel  # keep --help fast
    from blip2_jax.convert import lavis
    from blip2_jax.models import presets

    FROM_LAVIS.require(values, "src", "model", "out")
    with _bytes_bar(0, "from-lavis") as bar:
        out, notes = lavis.from_lavis(values.src, values.out, presets.get(values.model), vision=values.vision,
                                      text=values.text, dtype=values.out_dtype, progress=bar.update)
    print("\n".join(notes))
    _summary(values.out, out)


def _summary(path: str, out) -> None:
    print(f"wrote {path}: {out.architecture}, {len(out.shapes)} arrays, {out.nbytes / 2**20:.1f} MiB")


def _to_hf(values: flags.FlagValues) -> None:
    # pylint: disable=import-outside-toplevel  # keep --help fast
    import numpy as np

    from blip2_jax.convert import hf_export
    from blip2_jax.weights import model_checkpoint

    TO_HF.require(values, "src", "out")
    params = model_checkpoint.CheckpointParams.open(values.src, values.step)
    total = sum(int(np.prod(s)) * np.dtype(values.out_dtype or d).itemsize for s, d in params.shapes.values())
    with _bytes_bar(total, "to-hf") as bar:
        hf_export.to_hf(params, values.out, dtype=values.out_dtype, tokenizer=values.tokenizer or "",
                        max_shard_size=values.max_shard_size, merge_lora=values.merge_lora, progress=bar.update)
    print(f"wrote {values.out}")


def _to_lavis(values: flags.FlagValues) -> None:
    from blip2_jax.convert import lavis  # pylint: disable=import-outside-toplevel  # keep --help fast

    TO_LAVIS.require(values, "src", "out")
    print("\n".join(lavis.to_lavis(values.src, values.out, step=values.step, vision_out=values.vision_out,
                                   dtype=values.out_dtype)))
    print(f"wrote {values.out}")


def _data_build_flags(values: flags.FlagValues, argv: list[str]) -> None:
    del argv
    flags.DEFINE_multi_string("annotations", [], "LAVIS-style JSON annotation file; repeat for several.",
                              flag_values=values)
    flags.DEFINE_string("image_root", None, "Directory the annotations' image paths are relative to.",
                        flag_values=values)
    flags.DEFINE_string("webdataset", None, "Instead of annotations: WebDataset tar shards (comma-separated, brace "
                        "patterns such as /data/laion/{00000..00099}.tar).", flag_values=values)
    flags.DEFINE_string("parquet", None, "Instead of annotations: Parquet files (as --webdataset); a path column is "
                        "under --image_root.", flag_values=values)
    flags.DEFINE_string("columns", "", "With --parquet: KEY=COLUMN pairs (image, caption, id) not named so.",
                        flag_values=values)
    define_out(values, "a shard path prefix: PREFIX-<build>-00000-of-0000N.array_record, ... and "
               "PREFIX.manifest.json, replacing an earlier set of PREFIX")
    flags.DEFINE_integer("num_shards", 1, "Number of ArrayRecord files to write.", flag_values=values)


def _data_build(values: flags.FlagValues) -> None:
    from blip2_jax.data import sources  # pylint: disable=import-outside-toplevel  # keep --help fast

    if sum(map(bool, (values.webdataset, values.parquet, values.annotations))) > 1:
        raise app.UsageError(f"data build reads one of --annotations, --webdataset, --parquet\n{DATA_BUILD.usage()}")
    if values.webdataset:
        from blip2_jax.data.webdataset import WebDatasetSource  # pylint: disable=import-outside-toplevel

        DATA_BUILD.require(values, "out")
        source = WebDatasetSource(values.webdataset.split(","))
    elif values.parquet:
        from blip2_jax.data.loader import parquet_columns  # pylint: disable=import-outside-toplevel
        from blip2_jax.data.parquet import ParquetSource  # pylint: disable=import-outside-toplevel

        DATA_BUILD.require(values, "out")
        source = ParquetSource(values.parquet.split(","), image_root=values.image_root or "",
                               **parquet_columns(values.columns))
    else:
        DATA_BUILD.require(values, "annotations", "image_root", "out")
        source = sources.JsonSource(values.annotations, values.image_root)
    paths, missing = sources.write_array_records(source, values.out, values.num_shards)
    print(f"wrote {len(source) - len(missing)} records to {len(paths)} shards listed in "
          f"{sources.manifest_path(values.out)}; {len(missing)} left out (image missing or unreadable)")


FROM_HF = Command(("convert", "from-hf"), "--src DIR_OR_HUB_ID --out DIR [--out_dtype float32] [--adapter PEFT_DIR]",
                  "Hugging Face BLIP-2 weights -> a model checkpoint (Orbax), tensor by tensor.",
                  _from_hf_flags, _from_hf)
TO_HF = Command(("convert", "to-hf"), "--src DIR [--step N] --out DIR [--out_dtype bfloat16] [--tokenizer T] "
                "[--merge_lora]",
                "A model checkpoint or training workdir -> a Hugging Face directory transformers loads.",
                _to_hf_flags, _to_hf)
FROM_LAVIS = Command(("convert", "from-lavis"), "--src FILE.pth --model PRESET [--vision eva_vit_g.pth] "
                     "[--text DIR_OR_HUB_ID] --out DIR", "A LAVIS .pth -> a model checkpoint.",
                     _from_lavis_flags, _from_lavis)
TO_LAVIS = Command(("convert", "to-lavis"), "--src DIR [--step N] --out FILE.pth [--vision_out eva_vit_g.pth]",
                   "A model checkpoint or training workdir -> a LAVIS .pth (and eva_vit_g.pth).",
                   _to_lavis_flags, _to_lavis)
DATA_BUILD = Command(("data", "build"), "(--annotations FILE [--annotations FILE ...] --image_root DIR | "
                     "--webdataset PATTERN | --parquet PATTERN [--columns K=C,...]) --out PREFIX [--num_shards N]",
                     "LAVIS-style JSON annotations and their images, WebDataset tar shards or Parquet files -> "
                     "ArrayRecord shards.",
                     _data_build_flags, _data_build)
