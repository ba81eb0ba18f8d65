"""Bad input gets one clear error naming the file, what was expected and what was found, and writes nothing."""

import json
import shutil

import pytest
import torch
from oracle import FIXTURES, get_case
from safetensors.torch import save_file

from oft_core import OFTError, load_adapter
from oft_core.bake import bake
from oft_core.cli import main as cli

SD15 = FIXTURES / "kohya" / "sd15_oft_attn_dim8_bf16.safetensors"
FLUX = FIXTURES / "kohya" / "flux_tiny_oft_attn_dim4.safetensors"
FLUX_BASE = FIXTURES / "kohya" / "flux_tiny_base.safetensors"


def _kohya(tmp_path, blocks, name="oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"):
    path = tmp_path / "adapter.safetensors"
    save_file({f"{name}.oft_blocks": blocks, f"{name}.alpha": torch.tensor(1e-3)}, str(path))
    return path


def test_truncated_file(tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(SD15.read_bytes()[: SD15.stat().st_size // 2])
    with pytest.raises(OFTError, match="truncated") as e:
        load_adapter(bad)
    assert str(bad) in str(e.value)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "page.safetensors"
    bad.write_text("<html>404 Not Found</html>" * 10)
    with pytest.raises(OFTError, match="not a safetensors file") as e:
        load_adapter(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("name", ["adapter.pt", "adapter.safetensors"])
def test_pickle_is_refused_never_unpickled(tmp_path, name):
    path = tmp_path / name
    torch.save({"oft_unet_x.oft_blocks": torch.zeros(2, 4, 4)}, str(path))
    with pytest.raises(OFTError, match="pickle") as e:
        load_adapter(path)
    assert str(path) in str(e.value)


def test_nan_blocks(tmp_path):
    blocks = torch.zeros(8, 40, 40)
    blocks[3, 1, 2] = float("nan")
    with pytest.raises(OFTError, match="NaN or Inf") as e:
        load_adapter(_kohya(tmp_path, blocks))
    assert "attn1_to_q" in str(e.value)


def test_inf_in_peft_packed(tmp_path):
    d = tmp_path / "peft"
    shutil.copytree(get_case("peft_oft_cayley_bs8").adapter, d)
    from safetensors.torch import load_file

    sd = load_file(str(d / "adapter_model.safetensors"))
    k = next(iter(sd))
    sd[k][0, 0] = float("inf")
    save_file(sd, str(d / "adapter_model.safetensors"))
    with pytest.raises(OFTError, match="NaN or Inf"):
        load_adapter(d)


def test_block_size_that_fits_no_layer(tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(320, 320)},
              str(base))
    adapter = _kohya(tmp_path, torch.zeros(3, 7, 7))  # 21 rows, not 320
    out = tmp_path / "out.safetensors"
    with pytest.raises(OFTError) as e:
        bake(base, [(adapter, 1.0)], out)
    msg = str(e.value)
    assert "expected 21" in msg and "found 320" in msg and "attn1_to_q" in msg and "another model" in msg
    assert not out.exists() and list(tmp_path.glob(".oft-bake-*")) == []


def test_peft_packed_size_that_is_no_triangle(tmp_path):
    d = tmp_path / "peft"
    d.mkdir()
    shutil.copy(get_case("peft_oft_cayley_bs8").adapter / "adapter_config.json", d)
    save_file({"base_model.model.a.to_q.oft_R.weight": torch.zeros(4, 27)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(OFTError, match="27 values per block"):
        load_adapter(d)


def test_peft_packed_without_config_is_refused(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    shutil.copy(get_case("peft_oft_cayley_bs8").adapter / "adapter_model.safetensors", path)
    with pytest.raises(OFTError, match="a PEFT OFT file needs its adapter_config.json") as e:
        load_adapter(path)
    assert "OneTrainer" not in str(e.value)


def test_adapter_for_another_architecture(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    rc = cli(["bake", "--base", str(FLUX_BASE), "--adapter", str(SD15), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "0 of 128 adapter layers applied" in err and "another model architecture" in err and str(SD15) in err


def test_lora_file_is_named_as_such(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 4)},
              str(path))
    with pytest.raises(OFTError, match="LoRA file"):
        load_adapter(path)


def test_existing_output_is_never_overwritten(tmp_path, capsys):
    case = get_case("lycoris_diag_oft_dim8")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    rc = cli(["bake", "--base", str(case.base_file), "--adapter", str(case.adapter), "--out", str(out)])
    assert rc == 2 and out.read_bytes() == b"precious"
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["bake", "--base", str(case.base_file), "--adapter", str(case.adapter), "--out", str(out),
                "--overwrite"]) == 0
    assert out.read_bytes() != b"precious"


def test_output_over_base_refused(tmp_path):
    case = get_case("lycoris_diag_oft_dim8")
    base = tmp_path / "base.safetensors"
    shutil.copy(case.base_file, base)
    before = base.read_bytes()
    with pytest.raises(OFTError, match="over one of this command's inputs"):
        bake(base, [(case.adapter, 1.0)], base, overwrite=True)
    assert base.read_bytes() == before


def test_missing_file(tmp_path):
    with pytest.raises(OFTError, match="file not found"):
        load_adapter(tmp_path / "nope.safetensors")


def test_peft_config_of_another_method(tmp_path):
    d = tmp_path / "peft"
    shutil.copytree(get_case("peft_oft_cayley_bs8").adapter, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "LORA"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(OFTError, match="peft_type 'LORA'"):
        load_adapter(d)
