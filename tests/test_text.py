"""sf_core.text: UMT5 encoder (vs transformers), file layouts, fp8, tokenizer, errors, memory."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sf_core.errors import CheckpointError, SelfForcingError
from sf_core.text import (
    UMT5Config,
    encode_prompts,
    inspect_text_encoder,
    load_text_encoder,
    load_tokenizer,
)
from sf_core import weights
from sf_core.text import model as text_model
from sf_core.text.layouts import analyse
from fixtures import key_list
from fixtures.text import (
    TINY_CONFIG,
    random_umt5_weights,
    tiny_sentences,
    to_layout,
    train_tiny_sentencepiece,
    write_foreign_file,
    write_tiny_umt5,
    write_tokenizer_folder,
)

spm = pytest.importorskip("sentencepiece")

# long enough to cross the 128-token max distance of the position buckets, short enough to be fast
PROMPTS = [
    "the quick brown fox jumps over the lazy dog " * 20,  # > 160 tokens
    "a red cat",
    "",
    "camera slowly pans across a bright forest river at sunset, waves, café 42",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("umt5")
    return {
        "hf32": write_tiny_umt5(d / "hf32.safetensors", "comfy_hf", dtype=torch.float32),
        "hf16": write_tiny_umt5(d / "hf16.safetensors", "comfy_hf", dtype=torch.float16),
        "fp8": write_tiny_umt5(d / "fp8.safetensors", "comfy_fp8"),
        "wan32": write_tiny_umt5(d / "wan32.pth", "wan", dtype=torch.float32),
        "spm": train_tiny_sentencepiece(),
    }


def hf_umt5(cfg: UMT5Config, state_dict: dict):
    transformers = pytest.importorskip("transformers")
    hc = transformers.UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
    )
    model = transformers.UMT5EncoderModel(hc).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def hf_reference(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    return out


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------


def test_matches_transformers_umt5(files):
    te = load_text_encoder(files["hf32"], text_len=200)
    ids, mask = te.tokenize(PROMPTS)
    assert mask.sum(1)[0] == 200 and mask.sum(1)[2] == 1  # truncated prompt, empty prompt = [EOS]
    ours = te.encode_ids(ids, mask)
    model = hf_umt5(TINY_CONFIG, to_layout(random_umt5_weights(TINY_CONFIG, seed=0), "comfy_hf"))
    ref = hf_reference(model, ids, mask)
    real = mask[..., None].expand_as(ref)
    assert ref[~real].abs().max() > 0.1, "HF leaves padded rows non-zero; our zeroing is then a real difference"
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(ours[~real]) == 0, "padded positions must be exactly zero"
    assert ours[real].abs().max() > 0.5


def test_matches_transformers_for_short_prompts_at_512(files):
    """Short prompts in 512 slots (the usual case; the encoder may skip the all-padding tail)."""
    te = load_text_encoder(files["hf32"])
    ids, mask = te.tokenize(PROMPTS[1:])
    assert ids.shape == (3, 512) and int(mask.sum(1).max()) < 40
    model = hf_umt5(TINY_CONFIG, to_layout(random_umt5_weights(TINY_CONFIG, seed=0), "comfy_hf"))
    ref = hf_reference(model, ids, mask) * mask[..., None]
    torch.testing.assert_close(te.encode(PROMPTS[1:]), ref, atol=1e-5, rtol=1e-5)
    # a mask with a hole (not a prefix): still the same as transformers
    holey = mask.clone()
    holey[2, 1] = False
    ref = hf_reference(model, ids, holey) * holey[..., None]
    torch.testing.assert_close(te.encode_ids(ids, holey), ref, atol=1e-5, rtol=1e-5)


def test_output_shape_default_length_and_padding_independence(files):
    te = load_text_encoder(files["hf32"])
    out = te.encode(["a red cat", PROMPTS[0]])
    assert out.shape == (2, 512, TINY_CONFIG.dim) and out.dtype == torch.float32
    alone = te.encode(["a red cat"])
    n = int(te.tokenize(["a red cat"])[1].sum())
    # the same prompt gives the same rows whatever it is batched with, and zeros after its n tokens
    torch.testing.assert_close(out[0], alone[0], atol=1e-6, rtol=0)
    assert torch.count_nonzero(out[0, n:]) == 0 and torch.count_nonzero(out[0, :n].abs().sum(-1)) == n


def test_hf_and_wan_layouts_give_identical_embeddings(files, tmp_path):
    a = load_text_encoder(files["hf32"]).encode(PROMPTS)
    b = load_text_encoder(files["wan32"], tokenizer=files["spm"]).encode(PROMPTS)
    assert torch.equal(a, b)
    assert inspect_text_encoder(files["hf32"]).layout == "comfy_hf"
    assert inspect_text_encoder(files["wan32"]).layout == "wan"
    # bf16 files of both layouts: also identical, and weights stay bf16 in memory
    hf = load_text_encoder(write_tiny_umt5(tmp_path / "a.safetensors", "comfy_hf", dtype=torch.bfloat16))
    wan = load_text_encoder(write_tiny_umt5(tmp_path / "a.pth", "wan", dtype=torch.bfloat16), tokenizer=files["spm"])
    assert {p.dtype for p in hf.model.parameters()} == {torch.bfloat16}
    assert torch.equal(hf.encode(PROMPTS), wan.encode(PROMPTS))


def test_prefixed_hf_names_load(files, tmp_path):
    sd = load_file(str(files["hf16"]))
    save_file({("spiece_model" if k == "spiece_model" else "umt5xxl.transformer." + k): v for k, v in sd.items()},
              str(tmp_path / "prefixed.safetensors"))
    a = load_text_encoder(files["hf16"]).encode(PROMPTS[:2])
    b = load_text_encoder(tmp_path / "prefixed.safetensors").encode(PROMPTS[:2])
    assert torch.equal(a, b)


def test_bf16_compute_close_to_fp32(files):
    ref = load_text_encoder(files["hf32"]).encode(PROMPTS)
    low = load_text_encoder(files["hf32"], dtype=torch.bfloat16).encode(PROMPTS)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05  # bf16 has 8 bits of mantissa; a 2-layer net keeps the error at the percent level


# ---------------------------------------------------------------------------------------------
# fp8 scaled files
# ---------------------------------------------------------------------------------------------

E4M3_HALF_ULP = 2.0 ** -4  # 3 mantissa bits: round-to-nearest relative error <= 2^-4 for normal values
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10  # subnormal spacing 2^-9 (in units of the scale)


def test_fp8_weights_stay_fp8_and_dequantise_within_e4m3_precision(files):
    te = load_text_encoder(files["fp8"])
    orig = random_umt5_weights(TINY_CONFIG, seed=0)
    linears = [(n, m) for n, m in te.model.named_modules() if isinstance(m, text_model.Linear)]
    assert len(linears) == 7 * TINY_CONFIG.num_layers
    for name, lin in linears:
        assert lin.weight.dtype == torch.float8_e4m3fn, "fp8 weights must be kept in fp8 (memory)"
        assert lin.scale is not None and lin.scale.dtype == torch.float32
        w = orig[name + ".weight"]
        deq = lin.weight.float() * lin.scale
        bound = E4M3_HALF_ULP * w.abs() + E4M3_SUBNORMAL_HALF_STEP * lin.scale + 1e-7
        assert ((deq - w).abs() <= bound).all(), name
        assert (deq - w).abs().max() > 1e-4, "suspiciously exact: were the weights really quantised?"


def test_fp8_model_equals_transformers_on_dequantised_weights(files):
    from safetensors.torch import load_file

    sd = load_file(str(files["fp8"]))
    ref_sd = {}
    for k, v in sd.items():
        if k in ("spiece_model", "scaled_fp8") or k.endswith(".scale_weight"):
            continue
        scale = sd.get(k[: -len(".weight")] + ".scale_weight")
        ref_sd[k] = v.float() * scale if scale is not None else v.float()
    model = hf_umt5(TINY_CONFIG, ref_sd)
    te = load_text_encoder(files["fp8"])
    ids, mask = te.tokenize(PROMPTS)
    ref = hf_reference(model, ids, mask) * mask[..., None]
    torch.testing.assert_close(te.encode_ids(ids, mask), ref, atol=2e-5, rtol=1e-5)


def test_fp8_matches_fp16_within_fp8_error(files):
    ids_mask = load_text_encoder(files["hf32"]).tokenize(PROMPTS)
    mask = ids_mask[1]
    e32 = load_text_encoder(files["hf32"]).encode_ids(*ids_mask)[mask]
    e16 = load_text_encoder(files["hf16"]).encode_ids(*ids_mask)[mask]
    e8 = load_text_encoder(files["fp8"]).encode_ids(*ids_mask)[mask]
    err16 = ((e16 - e32).norm() / e32.norm()).item()
    err8 = ((e8 - e16).norm() / e16.norm()).item()
    # To first order the output error scales with the weights' relative rounding: fp16 rounds to 2^-11,
    # e4m3 to 2^-4, 128x coarser. The fp16 run measures this network's sensitivity, so fp8 must stay
    # within 2 x 128 x err16; and it must be clearly above fp16's (else no fp8 rounding happened).
    ratio = E4M3_HALF_ULP / 2.0 ** -11
    assert err8 <= 2 * ratio * err16, (err8, err16)
    assert err8 >= 8 * err16, (err8, err16)
    assert err8 < 0.25  # and small in absolute terms for this 2-layer model


def test_fp8_dequantised_at_load_equals_dequantised_at_use(files):
    lazy = load_text_encoder(files["fp8"])  # fp8 kept, dequantised per layer when it runs
    eager = load_text_encoder(files["fp8"], weight_dtype=torch.float32)  # dequantised while loading
    lin = eager.model.blocks[0].ffn.gate
    assert lin.weight.dtype == torch.float32 and lin.scale is None
    torch.testing.assert_close(eager.encode(PROMPTS), lazy.encode(PROMPTS), atol=1e-6, rtol=1e-6)
    bf = load_text_encoder(files["fp8"], weight_dtype=torch.bfloat16)
    assert {p.dtype for p in bf.model.parameters()} == {torch.bfloat16}


def test_fp8_weight_scale_spelling_and_per_row_scales(files, tmp_path):
    sd = load_file(str(files["fp8"]))
    out = {}
    for k, v in sd.items():
        if k.endswith(".scale_weight"):
            w8 = sd[k[: -len(".scale_weight")] + ".weight"]
            out[k.replace(".scale_weight", ".weight_scale")] = v.reshape(1, 1).expand(w8.shape[0], 1).contiguous()
        else:
            out[k] = v
    save_file(out, str(tmp_path / "rows.safetensors"))
    a = load_text_encoder(files["fp8"]).encode(PROMPTS)
    b = load_text_encoder(tmp_path / "rows.safetensors").encode(PROMPTS)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_embedded_spiece_model_tokenizes_like_sentencepiece(tmp_path):
    # a fresh model, trained here, different from the module fixture's
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_sentences(400, seed=11)), model_writer=buf, vocab_size=150,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    model_bytes = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    path = write_tiny_umt5(tmp_path / "te.safetensors", "comfy_hf", spiece=model_bytes)
    L = 16
    te = load_text_encoder(path, text_len=L)
    prompts = tiny_sentences(30, seed=12) + ["", "色调艳丽 unseen ✓", "x" * 3, " spaced   out\ttext "]
    ids, mask = te.tokenize(prompts)
    assert ids.shape == (len(prompts), L) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    for row, p in enumerate(prompts):
        pieces = sp.encode(p)
        expected = (pieces[: L - 1] + [1]) if len(pieces) >= L - 1 else pieces + [1] + [0] * (L - 1 - len(pieces))
        assert ids[row].tolist() == expected, p
        assert mask[row].tolist() == [True] * min(len(pieces) + 1, L) + [False] * max(0, L - 1 - len(pieces))
    # a prompt of exactly L-1 pieces fills the row: pieces + EOS, no padding
    exact = next((p for p in tiny_sentences(400, seed=13) if len(sp.encode(p)) == L - 1), None)
    if exact is not None:
        row_ids, row_mask = te.tokenize([exact])
        assert row_ids[0].tolist() == sp.encode(exact) + [1] and bool(row_mask.all())
    # default length is 512
    assert load_text_encoder(path).tokenize(["a"])[0].shape == (1, 512)


def test_tokenizer_sources_agree(files, tmp_path):
    sp = spm.SentencePieceProcessor(model_proto=files["spm"])
    (tmp_path / "tok.model").write_bytes(files["spm"])
    sources = {
        "bytes": files["spm"],
        "model file": tmp_path / "tok.model",
        "safetensors": files["hf32"],
        "folder (spiece.model)": write_tokenizer_folder(tmp_path / "sp_only", files["spm"], tokenizer_json=False),
    }
    try:
        pytest.importorskip("tokenizers")
        pytest.importorskip("transformers")
        sources["folder (tokenizer.json)"] = write_tokenizer_folder(tmp_path / "hf", files["spm"])
    except pytest.skip.Exception:
        pass
    prompts = tiny_sentences(50, seed=21) + ["UPPER case café", "a  b", ""]
    for name, src in sources.items():
        tok = load_tokenizer(src)
        assert tok.eos_id == 1 and tok.pad_id == 0, name
        for p in prompts:
            assert tok.encode(p) == sp.encode(p), (name, p)


def test_tokenizer_larger_than_embedding_is_rejected(files, tmp_path):
    small = UMT5Config(vocab_size=64, dim=16, ffn_dim=32, num_heads=2, head_dim=8, num_layers=1)
    path = write_tiny_umt5(tmp_path / "small.safetensors", "comfy_hf", config=small)
    with pytest.raises(CheckpointError, match="200 pieces.*64"):
        load_text_encoder(path)


# ---------------------------------------------------------------------------------------------
# Clear, early errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if any tensor data (besides the header) is read."""

    def boom(self, key):
        raise AssertionError(f"tensor data read ({key}) before the file was validated")

    monkeypatch.setattr(weights.SafetensorsReader, "read", boom)
    monkeypatch.setattr(weights.DictReader, "read", boom)


@pytest.mark.parametrize("kind, words", [("dit", "diffusion model"), ("vae", "VAE"), ("t5", "T5 v1.1")])
def test_foreign_file_rejected_before_reading_tensors(tmp_path, kind, words, no_tensor_reads):
    path = write_foreign_file(tmp_path / f"{kind}.safetensors", kind)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(path)
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert str(path) in msg and words in msg and "umt5" in msg.lower()


def test_real_dit_key_list_rejected(tmp_path, no_tensor_reads):
    """The key list of the real Wan 1.3B DiT (shapes only; zero-size data not needed: header is enough)."""
    keys = list(key_list("wan21_t2v_1.3B_original"))
    save_file({k: torch.zeros(1, dtype=torch.float16) for k in keys}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="DiT"):
        load_text_encoder(tmp_path / "dit.safetensors")


def test_not_a_weights_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_text_encoder(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_text_encoder(tmp_path / "missing.safetensors")


def test_truncated_file_is_reported(files, tmp_path):
    data = files["hf16"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_text_encoder(tmp_path / "cut.safetensors")


def test_missing_tokenizer_is_reported_before_loading_weights(files, tmp_path, no_tensor_reads):
    no_tok = write_tiny_umt5(tmp_path / "notok.safetensors", "comfy_hf", spiece=None)
    for path in (files["wan32"], no_tok):
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match="no tokenizer.*pass the tokenizer"):
            load_text_encoder(path)
        assert time.perf_counter() - t0 < 1.0
    with pytest.raises(CheckpointError, match="no such tokenizer"):
        load_text_encoder(files["wan32"], tokenizer=tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        load_text_encoder(files["wan32"], tokenizer=tmp_path)  # a folder without tokenizer files


def test_release_and_one_shot(files):
    te = load_text_encoder(files["hf32"])
    with te:
        first = te.encode(["a red cat"])
    assert te.model is None
    with pytest.raises(SelfForcingError, match="released"):
        te.encode(["a red cat"])
    assert torch.equal(encode_prompts(files["hf32"], ["a red cat"]), first)


# ---------------------------------------------------------------------------------------------
# Memory: meta-device construction, each tensor read once, in its file dtype
# ---------------------------------------------------------------------------------------------


def test_loading_never_initialises_and_holds_each_tensor_once(files, monkeypatch):
    def no_init(*a, **k):
        raise AssertionError("random initialisation during loading: the module was not built on meta")

    for name in ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, name, no_init)
    monkeypatch.setattr(torch.Tensor, "normal_", no_init)
    monkeypatch.setattr(torch.Tensor, "uniform_", no_init)
    for key in ("hf16", "fp8", "wan32"):
        te = load_text_encoder(files[key], tokenizer=files["spm"])
        info = te.info
        tensors = list(te.model.parameters()) + list(te.model.buffers())
        assert not any(t.is_meta for t in tensors)
        assert len({t.data_ptr() for t in tensors}) == len(tensors), "two parameters share or copy memory"
        held = sum(t.numel() * t.element_size() for t in tensors)
        assert held == info.nbytes(), (key, held, info.nbytes())  # nothing duplicated, nothing up-cast
        if key == "hf16":
            assert {p.dtype for p in te.model.parameters()} == {torch.float16}
            # the file stores the embedding twice (shared + encoder.embed_tokens): only one is used
            assert any(k.endswith("embed_tokens.weight") or k == "shared.weight" for k in info.ignored)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_growth_is_about_one_copy_of_the_weights(tmp_path):
    from sf_core.bench import measure_in_subprocess

    cfg = UMT5Config(vocab_size=8000, dim=1024, ffn_dim=2816, num_heads=16, head_dim=64, num_layers=6)
    path = write_tiny_umt5(tmp_path / "mid.safetensors", "comfy_hf", config=cfg, dtype=torch.bfloat16)
    r = measure_in_subprocess(path)
    used = r["tensor_bytes_used_in_file"]
    assert used > 150e6
    # One copy in the file dtype is ~1.0x; building the module in fp32 first and then loading a
    # state dict (the usual way) would be ~3x for a bf16 file. Allow allocator slack.
    assert r["peak_growth"] < 1.25 * used + 48e6, r
    assert r["peak_growth"] > 0.8 * used, r  # the measurement itself works: weights are resident
    assert r["tensor_bytes_held"] == used


def test_xxl_config_facts():
    cfg = UMT5Config()
    assert (cfg.num_layers, cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_buckets, cfg.vocab_size) == (
        24, 4096, 10240, 64, 32, 256384)
    assert math.isclose(cfg.num_params() / 1e9, 5.68, abs_tol=0.01)  # "about 5.7B parameters"


def test_xxl_key_lists_are_recognised(tmp_path):
    """The real XXL key lists (tests/fixtures/formats) map onto the XXL config."""
    for name, layout in (("umt5_xxl_comfy_hf_names", "comfy_hf"), ("umt5_xxl_wan_native", "wan")):
        keys = key_list(name)
        entries = {k: weights.TensorInfo(tuple(v[0]) if v[0] != ["N"] else (4,), torch.float16)
                   for k, v in keys.items()}
        info = analyse(Path(name), entries)
        assert info.layout == layout and info.config == UMT5Config()
        assert info.has_tokenizer == (layout == "comfy_hf")
