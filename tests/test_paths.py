from pathlib import Path

from modules.core.flags import parse_args
from modules.core.paths import AppPaths


def test_data_dir_moves_all_user_data(tmp_path):
    paths = AppPaths.from_opts(parse_args(["--data-dir", str(tmp_path)], env={}).opts, install_dir=Path("/app"))
    assert paths.ckpt_dir == tmp_path / "models" / "Stable-diffusion"
    assert paths.vae_dir == tmp_path / "models" / "VAE"
    assert paths.outputs_dir == tmp_path / "outputs"
    assert paths.extensions_dir == tmp_path / "extensions"
    assert paths.config_file == tmp_path / "config.json"
    assert paths.configs_dir == Path("/app/configs")  # shipped files stay with the install
    paths.ensure_user_dirs()
    assert paths.ckpt_dir.is_dir() and paths.embeddings_dir.is_dir()


def test_single_folder_flags_override(tmp_path):
    opts = parse_args(["--data-dir", str(tmp_path), "--ckpt-dir", str(tmp_path / "ck"),
                       "--ui-settings-file", str(tmp_path / "s.json")], env={}).opts
    paths = AppPaths.from_opts(opts)
    assert paths.ckpt_dir == tmp_path / "ck"
    assert paths.config_file == tmp_path / "s.json"
