"""The clip-interpret command line."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from clip_interpret import decompose, load_model
from clip_interpret.cli import main

TINY = "open_clip:test-vit-tiny"


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, colour in enumerate([(220, 20, 20), (20, 20, 220)]):
        path = tmp_path / f"img{i}.png"
        image = Image.new("RGB", (40, 30), colour)
        image.paste((250, 250, 250), (5, 5, 20, 20))
        image.save(path)
        paths.append(str(path))
    return paths


def test_models_lists_the_paper_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for spec in ("open_clip:ViT-B-16/openai", "open_clip:ViT-L-14/laion2b_s32b_b82k",
                 "open_clip:ViT-B-32/datacomp_m_s128m_b4k"):
        assert spec in out
    assert "ViT-B-16-plus-240" in out and "test-vit-tiny" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "[" in line}
    assert "[map] [timm/ViT-B-16-SigLIP] webli" in lines["ViT-B-16-SigLIP"]
    assert "[cls] [CLIP BPE]" in lines["ViT-bigG-14"] and "[facebook/xlm-v-base]" in lines["ViT-H-14-worldwide"]
    assert "[cls] [CLIP BPE]" in lines["EVA01-g-14"] and "[cls] [CLIP BPE]" in lines["EVA01-g-14-plus"]
    assert "[avg] [bert-base-uncased] " in lines["ViT-L-14-CLIPA"] and "[avg]" in lines["ViT-bigG-14-CLIPA-336"]
    assert "[map] [CLIP BPE]" in lines["PE-Core-B-16"] and "[map] [CLIP BPE]" in lines["PE-Core-bigG-14-448"]
    assert all("[cls] [CLIP BPE]" in lines[f"EVA02-{size}"] for size in ("B-16", "L-14", "L-14-336", "E-14",
                                                                         "E-14-plus"))
    assert not any(name.startswith(("RN50", "convnext")) for name in lines)
    refused = {line.split()[0]: line for line in out.split("open_clip architectures refused, and why")[1].splitlines()
               if line.startswith("  ")}
    assert "a ResNet image tower" in refused["RN50"] and "ConvNeXt" in refused["convnext_base"]
    assert not any(name.startswith(("EVA", "PE-Core", "coca_ViT", "ViT-B-16")) for name in refused)


def test_decompose_writes_json_and_heatmaps(images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["decompose", "--model", TINY, *images, "--text", "a red square", "--text", "blue",
                 "--layers", "1,2", "--spatial", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "top 5 heads" in printed
    report = json.loads((out / "decomposition.json").read_text())
    assert report["layers"] == [1, 2] and report["random_weights"] is True
    assert [e["source"] for e in report["images"]] == images
    # the printed/written numbers are the library's: recompute with the API
    model = load_model(TINY)
    d = decompose(model, images, layers=[1, 2])
    sims = d.similarity(model.encode_text(["a red square", "blue"]))
    for i, entry in enumerate(report["images"]):
        for t, item in enumerate(entry["texts"]):
            assert item["similarity"] == pytest.approx(float(sims[i, t]), abs=1e-6)
            # heads + other pieces add up to the similarity
            assert sum(item["pieces"].values()) == pytest.approx(item["similarity"], abs=1e-5)
            assert sum(item["heads"].values()) == pytest.approx(item["pieces"]["heads"], abs=1e-5)
            png = out / item["heatmap"]
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size[0] > 100
    assert len(list(out.glob("*.png"))) == 4


def test_decompose_without_text_lists_heads_by_norm(images, capsys):
    assert main(["decompose", "--model", TINY, images[0], "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "largest direct effect" in out
    assert sum(line.strip().startswith("L") for line in out.splitlines()) == 3


@pytest.mark.parametrize("argv, message", [
    (["decompose", "--model", "nonsense", "x.png"], "unknown model spec"),
    (["decompose", "--model", TINY, "missing.png"], "missing.png: no such file"),
    (["decompose", "--model", TINY, "IMG", "--layers", "7"], "layer 7 is out of range"),
    (["decompose", "--model", TINY, "IMG", "--spatial"], "give at least one --text"),
    (["decompose", "--model", TINY, "IMG", "--text", ""], "text #1 is empty"),
])
def test_errors_are_messages_not_tracebacks(argv, message, images, capsys):
    argv = [images[0] if a == "IMG" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_skip_bad_images(images, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"")
    assert main(["decompose", "--model", TINY, images[0], str(bad)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert main(["decompose", "--model", TINY, images[0], str(bad), "--skip-bad", "--text", "x"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "broken.jpg" in out and "empty" in out


def test_unwritable_output_folder(images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["decompose", "--model", TINY, images[0], "--out", str(blocker / "sub")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_demo_runs_on_a_given_model(tmp_path, capsys):
    assert main(["demo", "--model", TINY, "--out", str(tmp_path / "demo"), "--n", "60"]) == 0
    assert "RANDOM" in capsys.readouterr().out
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "random weights" in page and page.count("<figure>") == 3
    assert page.count("(published labels)</span>") == 6  # the paper's six models, beside the run's own rows


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "clip_interpret", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "decompose" in done.stdout


def _subcommands():
    """Every command line of the parser, sub-actions included (['toyworld', 'train'], ...)."""
    import argparse

    from clip_interpret.cli import build_parser

    def children(parser):
        return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    lines = []
    for name, parser in children(build_parser()).items():
        lines.append([name])
        lines += [[name, action] for action in children(parser)]
    return lines


def test_help_does_not_import_torch():
    """`clip-interpret --help` and every subcommand's --help build the parser without torch or numpy (the
    command modules import them inside the commands): help is instant."""
    lines = _subcommands()
    assert ["toyworld", "train"] in lines and ["ablate"] in lines and len(lines) > 20
    script = ("import contextlib, io, sys\n"
              "from clip_interpret.cli import main\n"
              f"for line in {lines!r} + [[]]:\n"
              "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
              "        try:\n"
              "            main(line + ['--help'])\n"
              "        except SystemExit as done:\n"
              "            assert done.code == 0, line\n"
              "    assert 'usage: clip-interpret' in out.getvalue(), line\n"
              "heavy = sorted({'torch', 'numpy', 'open_clip', 'PIL'} & set(sys.modules))\n"
              "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    script = "import runpy, sys\ntry:\n    runpy.run_module('clip_interpret', run_name='__main__')\n" \
             "except SystemExit:\n    pass\nassert 'torch' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "decompose" in done.stdout, done.stderr


def test_the_parsers_copies_of_library_names_match_the_library():
    from clip_interpret import analyses, device
    from clip_interpret.cli import common
    from clip_interpret.decompose import CONVENTIONS

    assert list(common.PRECISIONS) == list(device.PRECISIONS) and common.DEVICE_HELP == device.DEVICE_HELP
    assert common.CONVENTIONS == CONVENTIONS
    assert common.DEFAULT_K == analyses.DEFAULT_K and tuple(common.METRICS) == tuple(analyses.METRICS)


def test_the_public_api_is_still_there_lazily():
    """`import clip_interpret` is light, its public names load on use; `decompose` stays the function even
    after the submodule of that name is imported."""
    script = ("import sys\nimport clip_interpret as ci\nassert 'torch' not in sys.modules\n"
              "import clip_interpret.decompose\nassert callable(ci.decompose) and ci.decompose.__name__ == "
              "'decompose'\nassert ci.load_model.__name__ == 'load_model' and ci.Decomposition and ci.HookedViT\n"
              "assert ci.ClipModel and ci.load_image and ci.load_images and ci.ClipInterpretError\n"
              "from clip_interpret.runstore import open_source\n"
              "assert 'clip_interpret.toyworld' not in sys.modules\n"
              "assert len(open_source('toyworld:3:1')) == 3  # the toy world registers itself on first use\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_models_answers_from_its_cache_without_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    first = capsys.readouterr().out
    assert len(list(tmp_path.glob("models-*.json"))) == 1
    script = ("import sys\nfrom clip_interpret.cli import main\nassert main(['models']) == 0\n"
              "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "CLIP_INTERPRET_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == first
    next(tmp_path.glob("models-*.json")).write_text("{broken")  # a damaged cache is recomputed
    assert main(["models"]) == 0 and capsys.readouterr().out == first


def test_models_table_from_the_files_is_open_clips(monkeypatch):
    """The table read from the installed files (no torch) is the one open_clip gives, every architecture decided
    from the files; what they leave undecided, or a layout they do not expect, is asked of open_clip."""
    from clip_interpret import model_catalog

    from clip_interpret.models import PAPER_MODELS, openclip

    assert model_catalog.PAPER_MODELS == PAPER_MODELS and model_catalog.CONFIG_DIR == openclip.CONFIG_DIR
    assert model_catalog.NATIVE_REFUSED == openclip._NATIVE_REFUSED  # the copies kept without torch
    static, undecided = model_catalog.static_table()
    assert undecided == []
    asked = model_catalog.open_clip_table()  # the old way: open_clip's registry, timm trunks built on meta
    assert static == asked and len(asked["open_clip"]) > 50

    monkeypatch.setattr(model_catalog, "timm_tower_decision", lambda vision, functions: model_catalog.UNDECIDED)
    table, undecided = model_catalog.static_table()
    assert "ViT-B-16-SigLIP" in undecided and all(row[1] in ("cls", "avg", "attn-pool") for row in table["open_clip"])
    assert model_catalog.compute_model_table() == asked  # the undecided rows asked of open_clip, in order

    def surprise():
        raise model_catalog.CatalogError("another layout")

    monkeypatch.setattr(model_catalog, "static_table", surprise)
    assert model_catalog.compute_model_table() == asked


def test_models_first_call_does_not_import_torch(tmp_path):
    """`models` with an empty cache answers from the files: torch, open_clip and timm are not imported."""
    script = ("import sys\nfrom clip_interpret.cli import main\nassert main(['models']) == 0\n"
              "heavy = sorted({'torch', 'open_clip', 'timm', 'numpy'} & set(sys.modules))\nassert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "CLIP_INTERPRET_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "ViT-B-16-SigLIP" in done.stdout and len(list(tmp_path.glob("models-*.json"))) == 1


def test_timm_model_functions_are_read_as_the_trunk_check_would_judge_them(tmp_path):
    from clip_interpret.model_catalog import UNDECIDED, timm_tower_decision, timm_vit_functions

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vision_transformer.py").write_text(
        "@register_model\ndef plain(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=16, embed_dim=64, depth=2, num_heads=2, class_token=False, global_pool='map')\n"
        "    model = _create_vision_transformer('plain', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        "    return model\n"
        "@register_model\ndef regs(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=16, embed_dim=64, depth=2, num_heads=2, class_token=False, reg_tokens=4)\n"
        "    model = _create_vision_transformer('regs', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        "    return model\n"
        "@register_model\ndef with_cls(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=16, embed_dim=64, depth=2, num_heads=2)\n"
        "    model = _create_vision_transformer('with_cls', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        "    return model\n"
        "@register_model\ndef rms(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=16, embed_dim=64, depth=2, num_heads=2, class_token=False, norm_layer=RmsNorm)\n"
        "    model = _create_vision_transformer('rms', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        "    return model\n"
        "@register_model\ndef other(pretrained=False, **kwargs):\n"
        "    return _create_other('other', **kwargs)\n")
    functions = timm_vit_functions(tmp_path)
    assert functions["plain"]["embed_dim"] == 64 and functions["other"] is None

    def decide(name, pool="map", proj="none"):
        return timm_tower_decision({"timm_model_name": name, "timm_pool": pool, "timm_proj": proj}, functions)

    assert decide("plain") is True
    assert decide("plain", pool="token") is False and decide("plain", proj="mlp") is False
    assert decide("regs") is False and decide("with_cls") is False and decide("convnext_base") is False
    assert decide("rms") == UNDECIDED and decide("other") == UNDECIDED


def test_timm_eva_functions_are_read_as_the_eva_check_would_judge_them(tmp_path):
    from clip_interpret.model_catalog import UNDECIDED, timm_eva_functions, timm_tower_decision

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "eva.py").write_text(
        "@register_model\ndef eva01(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=14, embed_dim=64, depth=2, num_heads=2, mlp_ratio=96 / 64)\n"
        "    model = _create_eva('eva01', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        "    return model\n"
        "@register_model\ndef eva02(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=14, embed_dim=64, depth=2, num_heads=2, swiglu_mlp=True,\n"
        "                      norm_layer=partial(LayerNorm, eps=1e-5))\n"
        "    return _create_eva('eva02', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        "@register_model\ndef eva02_parts(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=14, embed_dim=64, depth=2, num_heads=2, swiglu_mlp=True, scale_mlp=True,\n"
        "                      scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16), use_post_norm=True)\n"
        "    return _create_eva('eva02_parts', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        "@register_model\ndef rope_vit(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=14, embed_dim=64, depth=2, num_heads=2, attn_type='rope')\n"
        "    return _create_eva('rope_vit', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        "@register_model\ndef qk_vit(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=14, embed_dim=64, depth=2, num_heads=2, qk_norm=True)\n"
        "    return _create_eva('qk_vit', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        "@register_model\ndef odd(pretrained=False, **kwargs):\n"
        "    model_args = dict(patch_size=14, embed_dim=64, depth=2, num_heads=2, norm_layer=RmsNorm)\n"
        "    return _create_eva('odd', pretrained=pretrained, **dict(model_args, **kwargs))\n")
    functions = timm_eva_functions(tmp_path)

    def decide(name, pool="token", proj=None):
        return timm_tower_decision({"timm_model_name": name, "timm_pool": pool, "timm_proj": proj}, functions)

    assert decide("eva01") is True and decide("eva01", proj="linear") is True
    assert decide("eva01", pool="avg") is False and decide("eva01", proj="mlp") is False
    assert decide("eva02_parts") is True and decide("rope_vit") is True  # PE's AttentionRope, here without rope
    assert decide("eva02") is True and decide("qk_vit") is False
    assert decide("odd") == UNDECIDED  # a norm_layer written otherwise


def test_timm_pe_core_functions_are_read_as_the_eva_check_would_judge_them(tmp_path):
    """Perception Encoder's arguments (timm's vit_pe_core_*): rotary attention on an xy grid, a LayerNorm before
    the blocks, a MAP head, a LayerNorm norm layer, bigG without a class token; an RmsNorm is left undecided,
    another rope_type and a trunk without a class token pooled by that token are refused."""
    from clip_interpret.model_catalog import UNDECIDED, timm_eva_functions, timm_tower_decision

    (tmp_path / "models").mkdir()
    pe_args = ("patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, global_pool='map', attn_type='rope', "
               "use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(14, 14), rope_grid_offset=1., "
               "rope_grid_indexing='xy', attn_pool_num_heads=8, attn_pool_mlp_ratio=4., ")
    functions = {"pe": "norm_layer=partial(LayerNorm, eps=1e-5)",
                 "pe_big": "class_token=False, mlp_ratio=8960 / 1536, norm_layer=partial(LayerNorm, eps=1e-5)",
                 "pe_rms": "norm_layer=partial(RmsNorm, eps=1e-6)",
                 "pe_mixed": "rope_type='mixed', norm_layer=partial(LayerNorm, eps=1e-5)"}
    (tmp_path / "models" / "eva.py").write_text("".join(
        f"@register_model\ndef {name}(pretrained=False, **kwargs):\n"
        f"    model_args = dict({pe_args}{extra})\n"
        f"    return _create_eva('{name}', pretrained=pretrained, **dict(model_args, **kwargs))\n"
        for name, extra in functions.items()))
    functions = timm_eva_functions(tmp_path)

    def decide(name, pool="map", proj=None):
        return timm_tower_decision({"timm_model_name": name, "timm_pool": pool, "timm_proj": proj}, functions)

    assert decide("pe") is True and decide("pe_big") is True and decide("pe", proj="linear") is True
    assert decide("pe", pool="avg") is False and decide("pe_big", pool="token") is False
    assert decide("pe_rms") == UNDECIDED and decide("pe_mixed") is False  # only rope_type 'cat' is expressed


def test_toyworld_train_defaults_are_the_recipes(monkeypatch, tmp_path):
    """The options default to None in the parser (no torch for --help); the command fills in TrainConfig's."""
    from clip_interpret.toyworld import train as train_module

    seen = {}

    def stop(out, cfg, **kwargs):
        seen["cfg"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", stop)
    assert main(["toyworld", "train", "--out", str(tmp_path), "--device", "cpu"]) == 130
    defaults = train_module.TrainConfig()
    assert seen["cfg"] == defaults.__class__(**{**defaults.to_dict(), "warmup": min(defaults.warmup,
                                                                                     defaults.steps // 2)})
    assert main(["toyworld", "train", "--out", str(tmp_path), "--steps", "10", "--device", "cpu"]) == 130
    assert seen["cfg"].steps == 10 and seen["cfg"].warmup == 5 and seen["cfg"].lr == defaults.lr


def test_published_label_rows_are_marked_in_every_table(tmp_path, monkeypatch):
    """The paper's six models are scored from their published labels: the CLI table, the chart and the report
    say so beside the rows measured on a run."""
    import matplotlib.pyplot as plt

    from clip_interpret import report
    from clip_interpret.metrics import bar_chart, format_comparison, published_scores, scores

    published = published_scores()
    rows = {"run: toy (taxonomy)": scores({"L0.H0": "color", "L0.H1": "shape"}), **published}
    lines = format_comparison(rows).splitlines()
    for spec in published:
        assert any(line.startswith(f"{spec} (published labels) ") for line in lines), spec
    assert "published" not in next(line for line in lines if line.startswith("run: toy"))
    assert any("not measured here" in line for line in lines)
    assert "published labels" not in format_comparison({"run": rows["run: toy (taxonomy)"]})

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    bar_chart(rows, tmp_path / "c.png")
    ax = figures[0].axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert "published" not in ticks[0] and sum("(published labels)" in t for t in ticks[1:]) == len(published)
    assert len([bar for bar in ax.patches if bar.get_hatch()]) == 3 * len(published)

    html = report._metrics_section({"rows": rows}, None)
    assert html.count("(published labels)</span>") == len(published) and "not measured here" in html


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    from clip_interpret.runstore import index_images

    model = load_model("toy")
    root = tmp_path_factory.mktemp("toy-runs")
    for storage in ("fp16", "fp32"):
        index_images(model, "toyworld:40:1", root / storage, storage=storage, progress=False, workers=0)
    return model, root


def test_ablate_is_quiet_and_says_what_its_reference_row_is(toy_runs):
    """No warning from torch (the read-only shard maps are copied, not handed to torch as they are); each mode
    says what its reference row is (the stored pieces' sum, or the model re-run)."""
    _, root = toy_runs
    run = str(root / "fp16")
    for argv, note in ((["ablate", run], "full: the sum of the run's stored pieces (fp16 storage"),
                       (["ablate", run, "--heads", "L5.H2", "--workers", "0"], "unmodified: the model re-run")):
        done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-m", "clip_interpret", *argv],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert note in done.stdout and "docs/hooks.md" in done.stdout
        assert "warning" not in done.stderr.lower(), done.stderr


def test_full_and_unmodified_rows_agree_on_an_fp32_run(toy_runs):
    """The mean-ablation study's `full` (stored pieces summed) and the interventions' `unmodified` (the model
    re-run) are the same predictions when the pieces are stored in fp32 (docs/hooks.md)."""
    from clip_interpret.ablation import ablation_study
    from clip_interpret.effects import intervention_study
    from clip_interpret.interventions import Targets
    from clip_interpret.runstore import open_run

    model, root = toy_runs
    run = open_run(root / "fp32")
    full = ablation_study(run, model)["accuracy"]["full"]
    unmodified = intervention_study(run, model, Targets.parse("L5.H2", run.vit_config()), workers=0)["accuracy"]["full"]
    assert full == unmodified


def test_loading_is_quiet_and_an_in_memory_model_does_not_claim_loaded_weights(tmp_path, capfd):
    """No transformers "Loading weights" bar on stderr; the repr of a model given in memory (here with random
    weights) does not say its weights were loaded."""
    from tests.helpers import make_hf_clip, make_open_clip

    make_hf_clip().save_pretrained(tmp_path / "hf")
    capfd.readouterr()
    model = load_model(f"hf:{tmp_path / 'hf'}")
    assert "Loading weights" not in capfd.readouterr().err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # restored for everyone else
    assert "loaded weights" in repr(model)
    shown = repr(load_model(make_open_clip("test-vit-tiny")))
    assert "loaded weights" not in shown and "in-memory weights" in shown


def test_each_command_lives_in_the_module_of_its_job():
    """One module per job (docs/architecture.md): a command's function is in the module named for it."""
    import argparse

    from clip_interpret.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    where = {name: parser.get_default("func").__module__.rsplit(".", 1)[1] for name, parser in sub.choices.items()}
    assert where == {
        "models": "models", "decompose": "decompose", "index": "index", "ablate": "ablate", "textspan": "textspan",
        "toyworld": "toyworld", "label": "label", "faithfulness": "faithfulness", "metrics": "scores",
        "report": "scores", "analyze": "analyze", "demo": "analyze", "property-nn": "analyses",
        "segment": "analyses", "contrast": "analyses", "image-nn": "analyses", "text-nn": "analyses", "app": "app",
        "segbench": "segbench", "spectra": "spectra", "debias": "debias"}


def test_ablate_help_splits_its_two_modes(capsys):
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    text = capsys.readouterr().out
    assert "ablate RUN                      the mean-ablation study" in text
    assert "ablate RUN --heads L10.H3,...   interventions" in text
    study = text.index("the mean-ablation study (ablate RUN):")
    chosen = text.index("interventions (ablate RUN --heads TARGETS and/or --property P):")
    assert study < text.index("--engine {local,ray}", study) < chosen  # the engine options: the study's
    for option in ("--heads", "--property", "--labels", "--mode", "--mean-images", "--groups", "--probe"):
        assert text.index(f"  {option} ", chosen) > chosen


def test_intervention_targets_and_file_come_from_the_library(toy_runs, tmp_path):
    """What `ablate --heads/--property` resolved and wrote in the command is the library's now."""
    from clip_interpret.effects import intervention_targets, save_intervention
    from clip_interpret.errors import ClipInterpretError
    from clip_interpret.runstore import open_run

    _, root = toy_runs
    run = open_run(root / "fp32")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labeller": "manual", "heads": {"L4.H1": {"label": "Colour"},
                                                                  "L5.H0": {"label": "shape"}}}))
    targets = intervention_targets(run, "L5.H2,MLP3", "colour", labels)
    assert targets.describe() == "L5.H2, L4.H1, MLP3"
    assert intervention_targets(run, None, "shape", labels).describe() == "L5.H0"
    with pytest.raises(ClipInterpretError, match=f"no head is labelled 'texture' in {labels}"):
        intervention_targets(run, "L5.H2", "texture", labels)
    with pytest.raises(ClipInterpretError, match="labels.json"):  # the run's own labels: none
        intervention_targets(run, None, "shape")
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(root / "fp32", copy)
    path = save_intervention(open_run(copy), {"accuracy": {}}, targets)
    assert path == copy / "intervention-l5-h2-l4-h1-mlp3.json" and json.loads(path.read_text()) == {"accuracy": {}}


def test_compare_runs_is_the_librarys(toy_runs, tmp_path):
    """`metrics`' comparison of runs is study.compare_runs: each run's metrics.json, the chart and its table;
    bad runs and an unwritable folder are one-line errors."""
    import shutil

    from clip_interpret.errors import ClipInterpretError
    from clip_interpret.study import compare_runs

    _, root = toy_runs
    shutil.copytree(root / "fp32", tmp_path / "a")
    (tmp_path / "a" / "labels-manual.json").write_text(json.dumps({"labeller": "manual", "heads": {
        "L4.H1": {"label": "color"}, "L5.H0": {"label": "shape"}}}))
    compared = compare_runs([tmp_path / "a"], out=tmp_path / "cmp")
    assert (tmp_path / "a" / "metrics.json").is_file()
    assert compared["chart"] == tmp_path / "cmp" / "comparison.png" and compared["chart"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(compared["table"].read_text()).keys() == compared["rows"].keys()
    assert list(compared["rows"])[0] == "toy (manual)" and len(compared["rows"]) == 1 + 6  # + the paper's six
    assert compare_runs([tmp_path / "a"], published=False)["chart"] == tmp_path / "a" / "metrics.png"
    with pytest.raises(ClipInterpretError, match="is not a run directory"):
        compare_runs([tmp_path / "a", tmp_path / "nothing"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ClipInterpretError, match="cannot write to output folder"):
        compare_runs([tmp_path / "a"], out=tmp_path / "file" / "sub")
