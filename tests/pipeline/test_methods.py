import json

import pytest

from commvq import io
from commvq.pipeline import methods
from tests.pipeline.conftest import SPEC


def test_a_beam_suffix_names_the_key_encoder_width(tmp_path):
    assert methods.split_beam("commvq-em2@8") == ("commvq-em2", 8)
    assert methods.split_beam("kivi2") == ("kivi2", None)
    for bad in ("commvq-em2@", "commvq-em2@0", "commvq-em2@x"):
        with pytest.raises(ValueError, match="beam width after @"):
            methods.split_beam(bad)
    with pytest.raises(ValueError, match="CommVQ methods only"):
        methods.resolve(["kivi2@4"], tmp_path)
    em = tmp_path / "codebook_6bits_8group_3residuals"
    em.mkdir()
    io.write_config(em, io.CodebookLayout(6, 8, 3), "em", SPEC, {"layers": {"0": {}}})
    values = tmp_path / "value_codec_2bit"
    values.mkdir()
    (values / "config.json").write_text(json.dumps({"quant_bits": 2}))
    plain, wide = methods.resolve(["commvq-em2", "commvq-em2@8"], tmp_path)
    assert (plain.name, plain.beam, wide.name, wide.beam) == ("commvq-em2", None, "commvq-em2@8", 8)
    assert plain.key_dir == wide.key_dir == em and wide.value_dir == values
