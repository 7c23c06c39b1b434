"""`t2eval evaluate`: one lm-eval run of the `t2` model on one task → one raw result cell.

    t2eval evaluate --model smollm2-135m --method t2-prompt --task math \
        --out results/raw/smollm2-135m/t2-prompt/math.json \
        --model-args "strategy=prompt,svd=svd/smollm2-135m-mlp.safetensors,experts=math:P,code:P,reasoning:P" \
        [--limit N] [--split test|fewshot_test] [--data-dir data] [--lm-eval-task gsm8k]

Runs `lm_eval.simple_evaluate` with t2eval's task YAMLs (`t2_<task>`, from
`t2eval.tasks.lm_eval_task_dir()`), the chat template applied and samples logged, then writes
the cell with `t2eval.results.write_cell` (per-sample outcomes + the chosen expert, first/second
pass timing, dispatch rows, lm-eval's results + config, provenance incl. sha256 of the model's
config, every expert file and the data). lm-eval's own results JSON and samples are kept beside
the cell in `<task>.lm_eval/`. `--lm-eval-task NAME` runs any lm-eval task (stock `gsm8k`,
`arc_challenge`, …) through `t2` instead, for leaderboard-comparable numbers.

`--protocol release|corrected` (default: $T2EVAL_PROTOCOL, else release) becomes the `t2`
model's `protocol=` (and the process default, so lm-eval's t2_* tasks agree); the cell records
`provenance.protocol` (`t2eval.protocol.record`: name, overrides, every knob) and, for few-shot
cells, `provenance.alpha_selection` from alpha.json. The SVD cache is checked against the model
(`svd.check_svd_for_model`) before anything is loaded; a foreign expert is refused unless
cross_model=true (the `t2` model checks every expert against the cache at construction).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import T2EvalError
from .stage_config import add_arguments as add_config_arguments, opt

log = logging.getLogger(__name__)

# sample-level metric names lm-eval may log, in order of preference
SAMPLE_METRICS = ("acc", "pass@1", "pass_at_1", "exact_match", "acc_norm")


@dataclass
class EvaluateConfig:
    """Options of `t2eval evaluate` (the CLI is generated from these fields)."""

    model: str = opt(help="registry key or HF directory (the cell's model name is the key, or the directory's name)",
                     required=True)
    method: str = opt(help="method name of the cell (base, svf, t2-prompt, ...)", required=True)
    task: str = opt(help="task key (gsm8k, mbpp, arc_easy, math, humaneval, arc_challenge)", required=True)
    out: str = opt(help="cell path, e.g. results/raw/<model>/<method>/<task>.json", required=True)
    model_args: str = opt("", help="t2 model_args, comma-separated key=value "
                          "(experts=math:P,code:P,reasoning:P is understood here)")
    limit: int | None = opt(None, help="only the first N documents (testing)")
    split: str = opt("test", help="documents to score (fewshot_test: after the 10 held-out few-shot ones)",
                     choices=("test", "fewshot_test"))
    data_dir: str | None = opt(None, help="canonical data dir (default: $T2EVAL_DATA_DIR or data)")
    lm_eval_task: str | None = opt(None, help="run this lm-eval task name instead of t2_<task>")
    include_path: str | None = opt(None, help="extra lm-eval task YAML directory")
    backend: str | None = opt(None, help="overrides backend= in model args", choices=("hf", "vllm"))
    batch_size: str | None = opt(None, help="lm-eval batch size (int or auto)")
    device: str | None = opt(None, help="torch device for backend=hf (default cpu)")
    seed: int = opt(0, help="lm-eval random seed (numpy/torch/fewshot seeds: 1234)")
    gen_kwargs: str | None = opt(None, help="lm-eval generation overrides, e.g. max_gen_toks=64 "
                                 "(testing/benchmarks only: results then differ from the protocol)")
    allow_code_execution: bool = opt(False, help="run generated code for mbpp/humaneval in the sandbox "
                                     "(sets HF_ALLOW_CODE_EVAL=1)")
    model_name: str | None = opt(None, help="model name written into the cell (default from --model)")
    protocol: str | None = opt(None, help="release (the code release, default) or corrected; "
                               "default: $T2EVAL_PROTOCOL, else release (overrides protocol= in model args)",
                               choices=("release", "corrected"))
    task_options: str | None = opt(None, help="JSON object of task options, e.g. '{\"ocr_in_prompt\": true}' "
                                   "(VQA tasks: ocr_in_prompt, normalise; default: the task's own, and "
                                   "ocr_in_prompt on for the embedded VLM)")


CONFIG = EvaluateConfig


def add_arguments(p) -> None:
    add_config_arguments(p, EvaluateConfig)


def parse_model_args(text: str | dict | None) -> dict[str, Any]:
    """`k=v,k=v` → dict; an item without `=` continues the previous value (so `experts=math:P,code:P`
    works), and a JSON object is accepted as is."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    s = text.strip()
    if s.startswith("{"):
        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise T2EvalError(f"--model-args looks like JSON but is not valid: {e}") from None
    out: dict[str, Any] = {}
    last = None
    for item in s.split(","):
        if not item.strip():
            continue
        if "=" in item:
            k, v = item.split("=", 1)
            last = k.strip()
            out[last] = v.strip()
        elif last is None:
            raise T2EvalError(f"--model-args item {item!r} is not key=value")
        else:
            out[last] += "," + item.strip()
    return out


def model_name(model: str) -> str:
    p = Path(model)
    if (p / "config.json").exists():
        meta = p / "t2eval_model.json"
        if meta.exists():
            key = json.loads(meta.read_text()).get("key")
            if key and key != "tiny-llama":
                return key
        return p.name
    return model


def lm_eval_task_name(task: str, split: str, model: str) -> str:
    """t2eval's lm-eval task for (task, split), with the model family's ARC pre-fill."""
    from .config import model_spec
    from .tasks import lm_eval_task_name as name

    try:
        family = model_spec(model).family
    except T2EvalError:
        family = None
    return name(task, "test", fewshot_excluded=(split == "fewshot_test"), family=family)


def code_chat_template(task: str) -> str | None:
    """The release's own chat template for code tasks (it replaces the model's), else None."""
    from .tasks import get_task

    try:
        return get_task(task).chat_template
    except T2EvalError:
        return None


def _task_dir() -> str | None:
    try:
        from .tasks import lm_eval_task_dir
    except ImportError:
        return None
    return str(lm_eval_task_dir())


def sample_value(sample: dict, metric: str) -> float:
    """The logged per-sample value of `metric` (VQA: the accuracy)."""
    if metric not in sample:
        raise T2EvalError(f"lm-eval sample for doc {sample.get('doc_id')} has no {metric!r}; keys: {sorted(sample)}")
    v = sample[metric]
    return float(v[0] if isinstance(v, (list, tuple)) else v)


def vlm_task_options(model_dir: str | Path, task: str, given: dict[str, Any]) -> dict[str, Any]:
    """Task options of a VQA task: `given`, plus ocr_in_prompt on for the embedded VLM (its vision tower is
    random: it can only read the OCR tokens) unless given."""
    from .constants import VLM_TASKS
    from .models.llava import EMBEDDED_KEY

    out = dict(given)
    if task in VLM_TASKS and "ocr_in_prompt" not in out and model_key(model_dir) == EMBEDDED_KEY:
        out["ocr_in_prompt"] = True
    return out


def model_key(model_dir: str | Path) -> str | None:
    """The `t2eval_model.json` key of a built model directory (None: not one of ours)."""
    meta = Path(model_dir) / "t2eval_model.json"
    try:
        return json.loads(meta.read_text()).get("key") if meta.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def parse_task_options(text: str | dict | None) -> dict[str, Any]:
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    from .config import json_object

    return json_object(text, "--task-options", '\'{"ocr_in_prompt": true}\'')


def sample_correct(sample: dict, metric: str | None = None) -> int:
    for k in ((metric,) if metric else ()) + SAMPLE_METRICS:
        if k and k in sample:
            v = sample[k]
            if isinstance(v, (list, tuple)):
                v = v[0]
            return int(float(v) >= 1.0 - 1e-9) if not isinstance(v, bool) else int(v)
    raise T2EvalError(f"lm-eval sample for doc {sample.get('doc_id')} has no per-sample metric "
                      f"(looked for {', '.join(SAMPLE_METRICS)}); keys: {sorted(sample)}")


def file_inputs(model_args: dict[str, Any]) -> dict[str, Any]:
    """{argument: "path sha256"} for every file-valued t2 argument (experts, svd, alpha, adapter)."""
    from .adapt.experts import parse_experts
    from .adapt.strategies import file_args
    from .provenance import sha256_file

    items: dict[str, str] = {}
    for k in file_args():
        v = model_args.get(k)
        if v and str(v) != "none":
            items[k] = str(v).split(":", 1)[1] if k == "adapter" and ":" in str(v) else str(v)
    for n, pth in parse_experts(model_args.get("experts")).items():
        items[f"expert_{n}"] = pth
    out: dict[str, Any] = {}
    for k, pth in items.items():
        f = Path(pth)
        if f.is_dir():
            files = sorted(x for x in f.iterdir() if x.is_file() and x.suffix in (".safetensors", ".json", ".bin"))
            out[k] = {str(x): sha256_file(x) for x in files}
        else:
            out[k] = {str(f): sha256_file(f) if f.exists() else None}
    return out


def data_files(data_dir: str | Path | None, task: str) -> dict[str, str]:
    """The canonical data files a task reads (from data/manifest.json), for provenance hashing."""
    root = Path(data_dir or os.environ.get("T2EVAL_DATA_DIR", "data"))
    man = root / "manifest.json"
    if not man.exists():
        return {}
    names = {"math": ("math",), "humaneval": ("humaneval", "humanevalplus"), "mbpp": ("mbppplus", "mbpp"),
             "gsm8k": ("gsm8k",), "arc_easy": ("arc_easy",), "arc_challenge": ("arc_challenge",)}.get(task, (task,))
    out = {"manifest.json": str(man)}
    for name, splits in json.loads(man.read_text()).get("datasets", {}).items():
        if name in names:
            for split, info in splits.items():
                p = Path(info.get("path", ""))
                p = root / p if (root / p).is_file() else p
                if p.is_file():
                    out[f"{name}/{split}"] = str(p)
    return out


def jsonable(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def build_lm(model: str, model_args: dict[str, Any], backend: str | None = None, batch_size=None,
             device: str | None = None):
    """The `t2` lm-eval model for these arguments (imports lm-eval and torch)."""
    from .lm import T2LM

    kw = dict(model_args)
    kw.setdefault("pretrained", model)
    if backend:
        kw["backend"] = backend
    if batch_size is not None:
        kw["batch_size"] = int(batch_size) if str(batch_size).isdigit() else batch_size
    if device and kw.get("backend", "hf") == "hf":
        kw["device"] = device
    return T2LM(**kw)


def hardware_name(lm=None) -> str:
    """What ran the evaluation, for Table 3: the GPU name(s), else the CPU model and core count."""
    import torch

    dev = str(getattr(lm, "device", "") or "")
    if dev.startswith("cuda") and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)}x {names[0]}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def evaluate(model: str, method: str, task: str, out: str | Path, model_args: dict[str, Any] | str = "", *,
             limit: int | None = None, split: str = "test", data_dir: str | None = None,
             lm_eval_task: str | None = None, include_path: str | None = None, backend: str | None = None,
             batch_size=None, device: str | None = None, seed: int = 0, name: str | None = None,
             lm=None, gen_kwargs: str | None = None, protocol: str | None = None,
             task_options: str | dict | None = None) -> dict[str, Any]:
    """Run one evaluation and write the cell; returns the cell. `lm` reuses an already built `t2`.
    `task_options`: options of the task object (JSON or dict; VQA: see `vlm_task_options`)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from . import provenance as prov
    from .config import DATA_DIR_ENV
    from .constants import VQA_METRIC
    from .models.llava import EMBEDDED_KEY as EMBEDDED_VLM
    from .results import TASK_METRIC, make_cell, write_cell

    from . import protocol as proto

    margs = parse_model_args(model_args)
    if protocol:
        margs["protocol"] = proto.check(protocol)
    margs.setdefault("protocol", proto.default_protocol())
    if "protocol_overrides" not in margs and proto.env_overrides():
        margs["protocol_overrides"] = json.dumps(proto.env_overrides(), sort_keys=True)
    proto.use(margs["protocol"], _overrides_of(margs))  # the task layer reads the same protocol
    if lm is None and margs.get("svd") and str(margs["svd"]) != "none":
        from .svd import check_svd_for_model

        check_svd_for_model(margs["svd"], model)  # StaleCacheError before minutes of loading
    if data_dir:
        os.environ[DATA_DIR_ENV] = str(data_dir)
    tname = lm_eval_task or lm_eval_task_name(task, split, model)
    if not lm_eval_task and lm is None and "chat_template_args" not in margs:
        tpl = code_chat_template(task)
        if tpl:
            margs["chat_template_args"] = {"chat_template": tpl}
    paths = [p for p in (_task_dir(), include_path) if p]
    from .models.loading import resolve_model_dir

    try:
        model_dir = str(getattr(lm, "t2_pretrained_dir", None) or resolve_model_dir(model))
    except T2EvalError:
        model_dir = str(model)  # built by the caller (`lm`), or reported by build_lm below
    topts = vlm_task_options(model_dir, task, parse_task_options(task_options))
    # lm-eval indexes its ~10k stock YAMLs unless told not to (tens of seconds): only when needed;
    # the task options reach the t2_* data hook (t2_utils.load) through the TaskManager's metadata
    tm = TaskManager(include_path=paths or None, include_defaults=not tname.startswith("t2_"),
                     metadata={"task_options": topts} if topts else None)
    if tname not in tm.all_tasks:
        hint = ("t2eval's task YAMLs (t2eval/tasks/lm_eval) define it" if tname.startswith("t2_")
                else "use a stock lm-eval task name or --include-path DIR with its YAML")
        raise T2EvalError(f"lm-eval task {tname!r} not found ({hint}); looked in {paths or 'lm-eval only'}")
    t0 = time.perf_counter()
    if lm is None:
        lm = build_lm(model, margs, backend, batch_size, device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=[tname], task_manager=tm, limit=limit,
                                  apply_chat_template=True, log_samples=True, random_seed=seed, gen_kwargs=gen_kwargs,
                                  confirm_run_unsafe_code=True, metadata={"data_dir": str(data_dir or "")} if data_dir else None)
    eval_s = time.perf_counter() - t1
    if res is None:
        raise T2EvalError("lm-eval returned no results (non-zero rank?)")
    samples = res.get("samples", {}).get(tname, [])
    if not samples:
        raise T2EvalError(f"lm-eval produced no samples for {tname} (empty split or --limit 0?)")
    metric = TASK_METRIC.get(task, "acc")
    rec = getattr(lm, "t2_records", {}).get(tname, {})
    chosen_of = {d["doc_id"]: d["chosen"] for d in rec.get("dispatch", [])}
    if metric == VQA_METRIC:  # VQA: the accuracy per sample; correct = accuracy > 0 (paired statistics)
        per_sample = sorted(({"doc_id": s["doc_id"], "accuracy": sample_value(s, metric),
                              "correct": int(sample_value(s, metric) > 0), "chosen": chosen_of.get(s["doc_id"])}
                             for s in samples), key=lambda r: r["doc_id"])
    else:
        per_sample = sorted(({"doc_id": s["doc_id"], "correct": sample_correct(s, metric),
                              "chosen": chosen_of.get(s["doc_id"])} for s in samples), key=lambda r: r["doc_id"])
    strategy = getattr(lm, "t2_strategy", None)
    two_pass = bool(strategy is not None and strategy.two_pass)  # a first pass chose the experts
    timing = {k: rec.get(k) for k in ("first_pass_s", "second_pass_s", "swap_s", "tokens_first", "tokens_second")}
    timing.update(total_s=eval_s, load_s=load_s, setup_swap_s=rec.get("setup_swap_s"),
                  prompt_tokens_first=rec.get("prompt_tokens_first"), dispatch_mode=rec.get("dispatch_mode"),
                  hardware=f"{hardware_name(lm)}, backend={margs.get('backend', backend or 'hf')}")
    dispatch = ([{k: d[k] for k in ("doc_id", "true_task", "chosen", "category") if k in d}
                 for d in rec.get("dispatch", [])] if two_pass else None)
    blob = jsonable({k: res.get(k) for k in ("results", "configs", "config", "versions", "n-shot", "higher_is_better",
                                             "n-samples")})
    info = jsonable(lm.get_model_info()) if hasattr(lm, "get_model_info") else {}
    config = {"model": model, "method": method, "task": task, "lm_eval_task": tname, "split": split,
              "limit": limit, "gen_kwargs": gen_kwargs, "model_args": margs, "t2": info.get("t2"), "apply_chat_template": True}
    if topts or metric == VQA_METRIC:  # LLM cells keep their config (and its hash) as before
        config["task_options"] = topts
    inputs = {"model_dir": str(getattr(lm, "t2_pretrained_dir", model))}
    cfg_json = Path(inputs["model_dir"]) / "config.json"
    if cfg_json.exists():
        inputs["model_config_sha256"] = prov.sha256_file(cfg_json)
    record = prov.record("evaluate", config, seeds={"random": seed, "numpy": 1234, "torch": 1234, "fewshot": 1234},
                         data_files=data_files(data_dir, task), inputs=inputs,
                         timings={"load_s": load_s, "eval_s": eval_s},
                         extra={"files": file_inputs(margs), "model_info": info})
    t2cfg = getattr(lm, "t2", None)
    record["protocol"] = (proto.record(t2cfg.protocol, t2cfg.protocol_overrides) if t2cfg is not None
                          else proto.record(margs["protocol"], _overrides_of(margs)))
    if strategy is not None and strategy.name == "fewshot" and margs.get("alpha"):
        sel = alpha_selection(margs["alpha"])
        if sel:
            record["alpha_selection"] = sel
    note = None
    if model_key(model_dir) == EMBEDDED_VLM:
        from .models.llava import NOTE_RANDOM_VISION as note

        record["note"] = note
    cell = make_cell(name or model_name(model), method, task, per_sample, metric=metric, timing=timing,
                     dispatch=dispatch, lm_eval=blob, split=split, provenance=record, note=note)
    out = Path(out)
    side = out.with_name(out.stem + ".lm_eval")
    side.mkdir(parents=True, exist_ok=True)
    prov.write_json_atomic(side / "results.json", jsonable({k: v for k, v in res.items() if k != "samples"}))
    tmp = side / f".samples.jsonl.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for s in jsonable(samples):
            f.write(json.dumps(s) + "\n")
    os.replace(tmp, side / "samples.jsonl")
    prov.write_json_atomic(side / "t2_records.json", jsonable(getattr(lm, "t2_records", {})))
    write_cell(out, cell)
    return cell


def _overrides_of(margs: dict[str, Any]) -> dict[str, Any] | None:
    from .lm import _overrides

    return _overrides(margs.get("protocol_overrides")) or None


def alpha_selection(alpha_path: str | Path) -> str | None:
    """How the few-shot α was chosen ("α selected on the reported set", ...), from alpha.json."""
    from .adapt.experts import load_alpha

    a = load_alpha(alpha_path)
    for d in (a, a.get("cem") or {}, a.get("summary") or {}):
        if isinstance(d, dict) and d.get("alpha_selection"):
            return str(d["alpha_selection"])
    return None


def run(args) -> int:
    if args.allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    cell = evaluate(args.model, args.method, args.task, args.out, args.model_args, limit=args.limit,
                    split=args.split, data_dir=args.data_dir, lm_eval_task=args.lm_eval_task,
                    include_path=args.include_path, backend=args.backend, batch_size=args.batch_size,
                    device=args.device, seed=args.seed, name=args.model_name, gen_kwargs=args.gen_kwargs,
                    protocol=args.protocol, task_options=args.task_options)
    t = cell["timing"] or {}
    first = f", first pass {t['first_pass_s']:.2f}s / second {t['second_pass_s']:.2f}s" if t.get("first_pass_s") else ""
    print(f"{cell['model']}/{cell['method']}/{cell['task']}: {cell['score']:.4f} "
          f"({cell['correct']}/{cell['total']}){first} -> {args.out}")
    return 0
