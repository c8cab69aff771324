"""`config.mesh.rules`: the logical->mesh rules are config data that decide every parameter's
sharding, and a parameter a rule cannot shard (the mesh does not divide its dimension) is reported
with its cost per device and refused past `config.mesh.max_replicated_mib`, before a workdir exists."""
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from blip2_jax.errors import UserError
from blip2_jax.parallel import mesh as mesh_lib
from blip2_jax.train import plan as plan_lib
from blip2_jax.train.layout import build_layout
from tests.test_cli_errors import user_error
from tests.test_train import ROOT, load_config

QFORMER_VOCAB = 30523  # BERT's 30522 + [DEC]: odd, so no tensor axis > 1 divides it


def _specs(layout) -> dict[str, P]:
    shardings = {**traverse_util.flatten_dict(layout.trainable_shardings, sep="/"),
                 **traverse_util.flatten_dict(layout.frozen_shardings, sep="/")}
    return {k: v.spec for k, v in shardings.items()}


def test_the_config_rules_decide_every_sharding():
    """Moving `mlp` from tensor to fsdp and replicating `embed` changes exactly the leaves that carry
    those axes, as the rules say; every other leaf keeps its default sharding."""
    config = load_config("configs/stage2_opt.py", "tiny")
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    default = _specs(build_layout(config, mesh))
    config.mesh.rules.update(mlp="fsdp", embed="")
    moved = _specs(build_layout(config, mesh))
    fc1 = "language_model/model/decoder/layers/fc1/kernel"  # (layers, embed, mlp)
    assert default[fc1] == P(None, "fsdp", "tensor") and moved[fc1] == P(None, None, "fsdp")
    head = "language_model/model/decoder/embed_tokens/embedding"  # (vocab, embed): vocab keeps tensor
    assert default[head] == P("tensor", "fsdp") and moved[head] == P("tensor", None)
    unchanged = [k for k in default if default[k] == moved[k]]
    assert all("fsdp" not in str(default[k]) for k in unchanged)  # every fsdp leaf was an embed or mlp leaf
    assert len(unchanged) < len(default)


def test_unknown_axes_and_mesh_names_are_refused():
    with pytest.raises(UserError, match=r"config.mesh.rules.mlp='pipe': expected distinct mesh axes"):
        mesh_lib.parse_rules({"mlp": "pipe"})
    with pytest.raises(UserError, match=r"config.mesh.rules.mlp='fsdp,fsdp'"):
        mesh_lib.parse_rules({"mlp": "fsdp,fsdp"})
    with pytest.raises(UserError, match=r"config.mesh.rules.hidden: not a logical axis"):
        mesh_lib.parse_rules({"hidden": "fsdp"})
    assert dict(mesh_lib.parse_rules({"embed": "fsdp,tensor", "mlp": ""}))["embed"] == ("fsdp", "tensor")


@pytest.mark.parametrize("tensor,refused", [(2, False), (8, True)])
def test_the_qformer_vocabulary_is_reported_and_refused_past_the_limit(tensor, refused):
    """Stage 1 at paper size (ViT-g, BERT vocabulary + [DEC]) on fsdp x tensor = 8: the word embeddings
    and the ITG head's bias are the only leaves whose `vocab` dimension the tensor axis cannot split.
    The embedding (vocab, embed) then holds 1/fsdp instead of 1/(fsdp x tensor) of its bytes per
    device, the bias (vocab,) all of them instead of 1/tensor."""
    config = load_config("configs/stage1.py", "vit_g")
    fsdp = 8 // tensor
    mesh = mesh_lib.make_mesh(data=1, fsdp=fsdp, tensor=tensor)
    embedding, bias = QFORMER_VOCAB * 768 * 4, QFORMER_VOCAB * 4  # float32 bytes
    expected = {"embeddings/word_embeddings/embedding": embedding // fsdp - embedding // (fsdp * tensor),
                "cls/predictions/bias": bias - bias // tensor}
    if refused:  # 78 MiB > the default 64
        with pytest.raises(UserError, match=r"1 parameter\(s\) replicated because the mesh does not divide them, past "
                                            r"config.mesh.max_replicated_mib=64; the largest: .*word_embeddings"):
            build_layout(config, mesh)
        config.mesh.max_replicated_mib = 80.0
    layout = build_layout(config, mesh)
    assert {r.path: r.extra_bytes for r in layout.replicated} == expected
    assert all(r.dims == ((0, "vocab", f"tensor={tensor}"),) for r in layout.replicated)
    assert _specs(layout)[layout.replicated[0].path][0] is None  # what the report says is what the sharding is


def test_plan_reports_what_is_replicated():
    config = load_config("configs/stage1.py", "vit_g")
    layout = build_layout(config, mesh_lib.make_mesh(data=1, fsdp=4, tensor=2))
    plan = plan_lib.Plan(mesh={"data": 1, "fsdp": 4, "tensor": 2}, batch_size=8, params_bytes=0, optimizer_bytes=0,
                         frozen_bytes=0, batch_bytes=0, argument_bytes=0, output_bytes=0, alias_bytes=0,
                         temp_bytes=0, flops_per_step=1.0, replicated=layout.replicated)
    report = plan.report("stage1", "v4")
    total = sum(r.extra_bytes for r in layout.replicated) / 2**20
    assert f"2 parameters, {total:.3f} MiB more per device" in report
    assert "word_embeddings/embedding [30523, 768]: dim 0 (vocab) 30523 over tensor=2 does not divide" in report


def test_train_refuses_unmet_rules_in_one_line_before_the_workdir(blip2_jax, tmp_path):
    """Through the CLI: `layers` over fsdp=8 cannot split the tiny model's 2 layers."""
    code, _, err = blip2_jax("train", "--config", f"{ROOT}/configs/stage1.py:tiny", "--workdir", str(tmp_path / "w"),
                             "--config.mesh.fsdp=8", "--config.mesh.rules.layers=fsdp",
                             "--config.mesh.max_replicated_mib=0")
    assert "replicated because the mesh does not divide them, past config.mesh.max_replicated_mib=0" in \
        user_error(code, err)
    assert "dim 0 (layers) 2 over fsdp=8 does not divide" in err
    assert not (tmp_path / "w").exists()
