"""The one safetensors IO layer (llmprune/io/checkpoint.py): size parser, shard writer (planned,
streaming, resumed), reader validation of damaged files, and `save_model` against transformers'
own `save_pretrained` for every family."""
import errno
import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmprune.errors import UserError
from llmprune.io.checkpoint import (CheckpointReader, ShardWriter, dtype_code, parse_size, plan_shards,
                                    write_state_dict)
from tiny_models import ARCH_CONFIGS, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("5G", 5 * 10**9), ("5gb", 5 * 10**9), (" 5 GB ", 5 * 10**9), ("500MB", 500 * 10**6),
    ("500MiB", 500 * 2**20), ("1.5GiB", 3 * 2**29), ("2e9", 2 * 10**9), ("1000", 1000), ("64KB", 64_000),
    ("12B", 12), ("3k", 3000), (1000, 1000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("junk", ["lots", "5XB", "", "GB", "-1GB", "0", "0.0001B", "1e", "5GBB", 0, -3, True])
def test_parse_size_junk_is_one_line(junk):
    with pytest.raises(UserError) as exc:
        parse_size(junk, "--max-shard-size")
    assert "--max-shard-size" in str(exc.value) and "\n" not in str(exc.value)


def sample_tensors():
    torch.manual_seed(3)
    a = torch.randn(10, 7)
    a[0, :3] = -0.0                                            # must be written as +0.0
    return {"a": a, "b": torch.randn(300).to(torch.bfloat16), "c": torch.arange(5), "mask": torch.rand(9) > 0.5,
            "d": torch.tensor(-0.0), "e": torch.randn(64, 64).half(),
            "nan": torch.tensor([float("nan"), float("inf"), -1e-40]),
            "big": torch.randn(400), "f8": torch.randn(16).to(torch.float8_e4m3fn),
            "t": torch.randn(8, 12).t()}                       # not contiguous


def bits(t):
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)


def expected_bits(t):
    """What the file must hold: the tensor with -0.0 -> +0.0, nothing else changed."""
    if t.is_floating_point():
        ints = t.contiguous().reshape(-1).view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])
        t = ints.masked_fill(ints == torch.iinfo(ints.dtype).min, 0).view(t.dtype)
    return bits(t)


def nbytes(t):
    return t.numel() * t.element_size()


def test_planned_and_streaming_writers_give_identical_hf_shards(tmp_path):
    tensors = sample_tensors()
    limit = 1000
    planned, streamed = tmp_path / "planned", tmp_path / "streamed"
    planned.mkdir(), streamed.mkdir()
    files = write_state_dict(tensors, planned, limit)
    writer = ShardWriter(streamed, limit)
    for name, t in tensors.items():
        writer.add(name, t)
    assert writer.close() == files
    assert not list(streamed.glob(".*"))                       # no temporary files left
    # the greedy plan: a shard closes before the tensor that would push it past the limit
    shard_of = plan_shards([nbytes(t) for t in tensors.values()], limit)
    assert shard_of == sorted(shard_of) and len(files) == shard_of[-1] + 1 > 2
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    index = json.loads((planned / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in tensors.values())
    assert index["weight_map"] == {n: files[s] for n, s in zip(tensors, shard_of)}
    for f in files:
        assert (planned / f).read_bytes() == (streamed / f).read_bytes()
        header = json.loads((planned / f).read_bytes()[8:8 + struct.unpack("<Q", (planned / f).read_bytes()[:8])[0]])
        assert header["__metadata__"] == {"format": "pt"}
        used = sum(nbytes(tensors[n]) for n in header if n != "__metadata__")
        assert used <= limit or len(header) == 2                # over the limit only when alone
    reader = CheckpointReader(planned)
    assert reader.names == list(tensors)                       # written order
    for name, t in tensors.items():
        got = reader.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(bits(got), expected_bits(t)), name
        assert reader.info(name).nbytes == nbytes(t)
    assert torch.signbit(reader.get("d")).item() is False and torch.isnan(reader.get("nan")[0])
    assert torch.equal(bits(load_file(str(planned / files[0]))["a"]), expected_bits(tensors["a"]))  # plain safetensors


def test_single_file_and_empty_checkpoint(tmp_path):
    (tmp_path / "one").mkdir()
    assert write_state_dict({"w": torch.ones(3)}, tmp_path / "one") == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    (tmp_path / "empty").mkdir()
    assert ShardWriter(tmp_path / "empty").close() == ["model.safetensors"]
    assert CheckpointReader(tmp_path / "empty").names == []


def test_writer_misuse(tmp_path):
    plan = [("a", (2,), "F32"), ("b", (3,), "F32")]
    with pytest.raises(RuntimeError, match="expected a next"):
        ShardWriter(tmp_path, plan=plan).add("b", torch.zeros(3))
    with pytest.raises(RuntimeError, match="planned F32"):
        ShardWriter(tmp_path, plan=plan).add("a", torch.zeros(3))
    (tmp_path / "s").mkdir()
    writer = ShardWriter(tmp_path / "s")
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="already written"):
        writer.add("a", torch.zeros(2))


@pytest.mark.parametrize("crash_after, shard_finished_after_journal", [(2, False), (5, True)])
def test_resume_after_crash_is_bit_identical(tmp_path, crash_after, shard_finished_after_journal):
    """Journal after tensor k, keep writing (work that a crash then loses, possibly finishing the
    open shard), resume from the journal and redo: same files as a run that never stopped."""
    tensors = list(sample_tensors().items())
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    clean.mkdir(), crashed.mkdir()
    writer = ShardWriter(clean, 1000)
    for name, t in tensors:
        writer.add(name, t)
    files = writer.close()

    writer = ShardWriter(crashed, 1000)
    for name, t in tensors[:crash_after]:
        writer.add(name, t)
    journal = json.loads(json.dumps(writer.state()))           # what a work folder would keep
    for name, t in tensors[crash_after:crash_after + 3]:
        writer.add(name, t)                                    # work the crash loses
    assert (len(writer.finished) > len(journal["finished"])) == shard_finished_after_journal
    writer.abort()                                             # the process dies here
    resumed = ShardWriter.resume(crashed, journal)
    for name, t in tensors[crash_after:]:
        resumed.add(name, t)
    assert resumed.close() == files
    for f in [*files, "model.safetensors.index.json"]:
        assert (crashed / f).read_bytes() == (clean / f).read_bytes(), f
    assert not list(crashed.glob(".*"))


def test_disk_full_is_one_line(tmp_path, monkeypatch):
    import llmprune.io.checkpoint as ckpt

    class Full:
        def __init__(self, *a, **k):
            pass

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(ckpt, "open", Full, raising=False)
    with pytest.raises(UserError, match="disk full while writing .*model.safetensors.*free space") as exc:
        write_state_dict({"w": torch.ones(1000)}, tmp_path)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------- damaged files

def write_one(directory, tensors=None):
    directory.mkdir(parents=True, exist_ok=True)
    write_state_dict(tensors or {"a": torch.randn(50, 4), "b": torch.randn(20)}, directory)
    return directory / "model.safetensors"


def assert_corrupt(directory, path):
    with pytest.raises(UserError) as exc:
        CheckpointReader(directory)
    message = str(exc.value)
    assert str(path) in message and "truncated or corrupt" in message and "copy or download it again, or re-save it" in message
    assert "\n" not in message


def test_truncated_and_corrupt_files_are_one_line(tmp_path):
    path = write_one(tmp_path / "cut")
    data = path.read_bytes()
    path.write_bytes(data[:-10])                               # a cut-off download
    assert_corrupt(tmp_path / "cut", path)
    path.write_bytes(data[:5])                                 # shorter than the length prefix
    assert_corrupt(tmp_path / "cut", path)
    path.write_bytes(struct.pack("<Q", 10**6) + data[8:])      # header length past the end
    assert_corrupt(tmp_path / "cut", path)
    n = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[:8] + b"\x00" * n + data[8 + n:])     # header bytes destroyed
    assert_corrupt(tmp_path / "cut", path)
    path.write_bytes(data + b"junk")                           # trailing bytes
    assert_corrupt(tmp_path / "cut", path)
    header = json.loads(data[8:8 + n])
    header["b"]["data_offsets"][1] += 4                        # offsets disagree with the shape
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    assert_corrupt(tmp_path / "cut", path)


def test_sharded_checkpoint_errors(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    files = write_state_dict({"a": torch.randn(50, 4), "b": torch.randn(200)}, d, 900)
    assert len(files) == 2
    (d / files[1]).write_bytes((d / files[1]).read_bytes()[:100])
    assert_corrupt(d, d / files[1])
    (d / files[1]).unlink()
    with pytest.raises(UserError, match=f"shard {files[1]} listed in model.safetensors.index.json is missing"):
        CheckpointReader(d)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid safetensors index"):
        CheckpointReader(d)


def test_missing_or_pickle_only_weights(tmp_path):
    with pytest.raises(UserError, match="no model.safetensors"):
        CheckpointReader(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="safetensors only"):
        CheckpointReader(tmp_path)


def test_cli_commands_name_the_damaged_file(tmp_path, capsys):
    """pack, delta, compress and eval refuse a truncated checkpoint with one line naming the file."""
    from llmprune.cli import main

    model = tiny_model("llama")
    src = tmp_path / "model"
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (tmp_path / "calib.txt").write_text("def f(x):\n    return x\n" * 500)
    capsys.readouterr()
    for argv in (["pack", str(src), "--output", str(tmp_path / "p")],
                 ["delta", str(src), str(src), "--output", str(tmp_path / "d"), "--no-progress"],
                 ["compress", str(src), "--method", "magnitude", "--sparsity", "0.5", "--output", str(tmp_path / "c")],
                 ["eval", str(src), "--ppl-data", str(tmp_path / "calib.txt"), "--output", str(tmp_path / "e")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(weights) in err[0] and "truncated or corrupt" in err[0], err


# ------------------------------------------------------------------------ save_model vs save_pretrained

def load_clean(path, capfd):
    """from_pretrained that must report nothing: no missing/unexpected/mismatched keys, no LOAD REPORT."""
    capfd.readouterr()
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    out = capfd.readouterr()
    text = (out.out + out.err).lower()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for word in ("load report", "missing", "unexpected", "newly initialized"):
        assert word not in text, text
    return model.eval()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_save_model_matches_save_pretrained(arch, tie, tmp_path, capfd):
    from llmprune.io.save import save_model

    model = tiny_model(arch, tie_word_embeddings=tie)
    with torch.no_grad():                                      # pruned-looking weights with -0.0
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_((torch.rand_like(p) > 0.5).float())
    ours, hf, sharded = tmp_path / "ours", tmp_path / "hf", tmp_path / "sharded"
    tok = tiny_tokenizer()
    assert save_model(model, tok, ours) == ["model.safetensors"]
    model.save_pretrained(hf)
    a, b = CheckpointReader(ours), CheckpointReader(hf)
    assert sorted(a.names) == sorted(b.names)                  # tied weights once, v5 renames reverted
    for name in a.names:
        assert torch.equal(a.get(name), b.get(name)), name
        t = a.get(name)
        if t.is_floating_point():
            assert not torch.signbit(t[t == 0]).any(), name    # exact +0.0
    assert json.loads((ours / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert (ours / "generation_config.json").is_file() == (hf / "generation_config.json").is_file()
    assert (ours / "tokenizer.json").is_file()

    files = save_model(model, tok, sharded, max_shard_size="20KB")
    assert len(files) > 3 and (sharded / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        for directory in (ours, sharded):
            reloaded = load_clean(directory, capfd)
            assert torch.equal(reloaded(ids).logits, ref), directory
            if tie:
                assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_save_model_leaves_the_model_alone(tmp_path):
    from llmprune.io.save import save_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :4] *= 0  # -0.0 where negative
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(model, None, tmp_path)
    assert all(torch.equal(bits(before[k]), bits(v)) for k, v in model.state_dict().items())
    assert dtype_code(torch.bfloat16) == "BF16"
