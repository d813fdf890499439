import pytest
import torch

from commvq import io
from commvq.codecs.key_codebook import KeyCodebook
from commvq.quant.commutative import codewords, interleave_pairs
from commvq.spec import ModelSpec

SPEC = ModelSpec(
    "llama",
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    hidden_size=32,
    max_position=128,
    rope_theta=1e4,
)


def test_dir_names_round_trip():
    lay = io.CodebookLayout(12, 128, 21)
    assert lay.dir_name == "codebook_12bits_128group_21residuals"
    assert io.parse_dir_name(lay.dir_name) == lay
    e2e = io.parse_dir_name("codebook_e2e_6bits_128group_21residuals")
    assert e2e == io.CodebookLayout(6, 128, 21, e2e=True) and e2e.bits_per_channel == pytest.approx(
        0.984, abs=1e-3
    )
    assert io.parse_dir_name("my_codebooks") is None
    assert io.head_file("d", 3, 7).name == "003_7.pt"


def _write_dir(folder, r=3, e=4, with_centers=False):
    lay = io.CodebookLayout(4, 8, r)
    thetas = torch.randn(2, 2, r, 2 * e, 4)
    for layer in range(2):
        for h in range(2):
            io.save_head(
                io.head_file(folder, layer, h), thetas[layer, h], torch.rand(r), 0.5, with_centers
            )
    io.write_config(folder, lay, "em", SPEC, {})
    return thetas


def test_save_load_reference_layout_weights_only(tmp_path):
    thetas = _write_dir(tmp_path, with_centers=True)
    data = torch.load(io.head_file(tmp_path, 1, 0), weights_only=True)
    assert set(data) == {"final_error", "steps"} and len(data["steps"]) == 3
    step = data["steps"][2]
    assert step["mse_loss"].dim() == 0 and step["theta"].dtype == torch.float32
    assert torch.equal(
        step["clustering_centers"], interleave_pairs(codewords(thetas[1, 0, 2][None])[0])
    )
    loaded = io.load_layer(tmp_path, 1, SPEC)
    assert torch.equal(loaded, thetas[1])


def test_save_load_gives_identical_codes(tmp_path):
    thetas = _write_dir(tmp_path)
    k = torch.randn(50, 16)
    a = KeyCodebook(thetas[0], code_bits=4)
    b = io.load_key_codebook(tmp_path, 0, SPEC)
    codes_a, s_a = a.encode(k)
    codes_b, s_b = b.encode(k)
    assert torch.equal(codes_a, codes_b) and torch.equal(s_a, s_b)
    assert codes_a.shape == (50, 2, 3) and codes_a.dtype == torch.int16
    assert a.code_size() == 2 * 3 * 4 + 16
    assert torch.equal(a.decode(codes_a, s_a), b.decode(codes_b, s_b))


def test_directory_that_does_not_fit_is_refused(tmp_path):
    _write_dir(tmp_path)
    other = ModelSpec("llama", 2, 4, 2, 16, 64, 128, 1e4)
    with pytest.raises(ValueError, match="head_dim 8, the model has 16"):
        io.load_layer(tmp_path, 0, other)
    fewer = ModelSpec("llama", 2, 3, 3, 8, 24, 128, 1e4)
    with pytest.raises(ValueError, match="num_kv_heads=2, the model has 3"):
        io.check_fits(tmp_path, fewer)
    with pytest.raises(FileNotFoundError):
        io.check_fits(tmp_path / "none", SPEC)
    io.head_file(tmp_path, 1, 1).unlink()
    with pytest.raises(FileNotFoundError, match="001_1.pt"):
        io.load_layer(tmp_path, 1, SPEC)
    io.head_file(tmp_path, 1, 0).write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable codebook"):
        io.load_layer(tmp_path, 1, SPEC)


def test_a_head_file_holds_only_its_own_stages(tmp_path):
    """A file saved from a view of a larger tensor (all heads, all stages) must not carry the rest
    of that tensor's storage: theta-only files stay about R x 2E x P x 4 bytes."""
    big = torch.randn(8, 5, 16, 6)  # [H, R, 2E, P]
    io.save_head(tmp_path / "000_3.pt", big[3], torch.rand(5), 0.1)
    data = torch.load(tmp_path / "000_3.pt", weights_only=True)
    assert all(s["theta"].untyped_storage().nbytes() == 16 * 6 * 4 for s in data["steps"])
    assert (tmp_path / "000_3.pt").stat().st_size < 5 * 16 * 6 * 4 + 4096
