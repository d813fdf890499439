import json

import pytest

from commvq import io
from commvq.pipeline import methods
from tests.pipeline.conftest import SPEC


def _workdir(tmp_path):
    """An EM codebook folder and a 2-bit value codec folder (configs only) under ``tmp_path``."""
    em = tmp_path / "codebook_6bits_8group_3residuals"
    em.mkdir()
    io.write_config(em, io.CodebookLayout(6, 8, 3), "em", SPEC, {"layers": {"0": {}}})
    values = tmp_path / "value_codec_2bit"
    values.mkdir()
    (values / "config.json").write_text(json.dumps({"quant_bits": 2}))
    return em, values


def test_a_beam_suffix_names_the_key_encoder_width(tmp_path):
    assert methods.split_beam("commvq-em2@8") == ("commvq-em2", 8)
    assert methods.split_beam("kivi2") == ("kivi2", None)
    for bad in ("commvq-em2@", "commvq-em2@0", "commvq-em2@x"):
        with pytest.raises(ValueError, match="beam width after @"):
            methods.split_beam(bad)
    with pytest.raises(ValueError, match="CommVQ methods only"):
        methods.resolve(["kivi2@4"], tmp_path)
    em, values = _workdir(tmp_path)
    plain, wide = methods.resolve(["commvq-em2", "commvq-em2@8"], tmp_path)
    assert (plain.name, plain.beam, wide.name, wide.beam) == ("commvq-em2", None, "commvq-em2@8", 8)
    assert plain.key_dir == wide.key_dir == em and wide.value_dir == values


def test_a_coarse_suffix_decodes_coarse_to_fine(tmp_path):
    from commvq.quant.coarse import CoarseSettings

    em, values = _workdir(tmp_path)
    settings = CoarseSettings(stages=1, keep=0.1)
    plain, coarse, both = methods.resolve(
        ["commvq-em2", "commvq-em2+coarse", "commvq-em2@8+coarse"], tmp_path, coarse=settings
    )
    assert plain.coarse is None and plain.exact_mode is None
    assert coarse.coarse == settings and coarse.exact_mode == "commvq-em2"
    assert (both.beam, both.exact_mode, both.key_dir) == (8, "commvq-em2@8", em)
    assert methods.resolve(["commvq-em2+coarse"], tmp_path)[0].coarse == CoarseSettings()
    with pytest.raises(ValueError, match="CommVQ methods only"):
        methods.resolve(["fp16+coarse"], tmp_path)
    with pytest.raises(ValueError, match="--key_dir"):
        methods.resolve(["commvq+coarse"], tmp_path, value_dir=values)
