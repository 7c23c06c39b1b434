"""The `t2` model's adaptation strategies, one class each, in one registry (like lm-eval's
`@register_model`).

    single pass  none (base weights), svf (adapter=svf:PATH), lora (adapter=lora:PATH),
                 fewshot (the α-mixture of the experts, loaded once)
    two passes   prompt, cls: a first pass chooses an expert per document (PROTOCOL §6)

A strategy class owns everything that differs between strategies:
  * `name` (the `strategy=` value, or the `adapter=` kind when `adapter` is true), `two_pass`,
    `uses_svf` (changes weights through SVF scales), `needs_experts`, `file_args` (its file-valued
    model_args, hashed into the cell's provenance);
  * `validate()` of its model_args, `setup(bank)` (scales held for the whole run: the svf adapter,
    the few-shot mixture), the first pass (`first_pass_scales` + `choose`), and the kwargs its
    backends need (`hf_kwargs`, `vllm_kwargs`: peft, worker extension, max_logprobs=-1, ...);
  * its result cells: `methods` (workflow method -> config section), `cells()` (which (method,
    task) cells a method produces) and `cell_spec()` (the files and model_args of one cell).

`t2eval.lm`, `t2eval.evaluate`, `t2eval.plan`, `t2eval.report.figures` and the workflow schema's
method enums read this registry; nothing else compares strategy names. A new strategy is one
subclass decorated with `@register_strategy("name")` (see tests/test_strategies.py's oracle).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable, ClassVar, Mapping

from ..constants import CATEGORY_OF_TASK, EXPERT_NAMES, TASK_OF_EXPERT, TRAIN_TASKS, UNSEEN_TASKS
from ..errors import T2EvalError

DISPATCH_MODES = ("generate", "logprob")
SECTIONS = ("evaluate", "ablations", "cross_model")  # the workflow config sections that list methods

_REGISTRY: "OrderedDict[str, type[Strategy]]" = OrderedDict()


def register_strategy(name: str) -> Callable[[type["Strategy"]], type["Strategy"]]:
    """Class decorator: make `cls` the strategy called `name` (a duplicate name is an error)."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise T2EvalError(f"strategy {name!r} is already registered ({_REGISTRY[name].__name__})")
        taken = {m: o for o in _REGISTRY.values() if o is not cls for m in o.methods}
        clash = [m for m in cls.methods if m in taken]
        if clash:
            raise T2EvalError(f"strategy {name!r}: method {clash[0]!r} already belongs to {taken[clash[0]].name!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def unregister_strategy(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> dict[str, type["Strategy"]]:
    """{name: class}, in registration order."""
    return dict(_REGISTRY)


def get_strategy(name: str) -> type["Strategy"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise T2EvalError(f"unknown strategy {name!r}; known: {', '.join(_REGISTRY)}") from None


def _or(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def strategy_names() -> list[str]:
    """The values `strategy=` accepts (adapter strategies are chosen with `adapter=KIND:PATH`)."""
    return [n for n, c in _REGISTRY.items() if not c.adapter]


def adapter_kinds() -> list[str]:
    return [n for n, c in _REGISTRY.items() if c.adapter]


def strategy_for(cfg) -> "Strategy":
    """The validated strategy object of a `t2` configuration (`t2eval.lm.T2Config`)."""
    names = strategy_names()
    if cfg.strategy not in names:
        raise T2EvalError(f"strategy={cfg.strategy!r}: use one of {', '.join(names)}")
    if cfg.dispatch not in DISPATCH_MODES:
        raise T2EvalError(f"dispatch={cfg.dispatch!r}: use generate or logprob")
    kind = cfg.adapter_kind
    if kind not in ("none", *adapter_kinds()) or (kind != "none" and ":" not in cfg.adapter):
        raise T2EvalError(f"adapter={cfg.adapter!r}: use {_or(['none'] + [f'{k}:PATH' for k in adapter_kinds()])}")
    if kind != "none" and cfg.strategy != "none":
        raise T2EvalError(f"adapter={cfg.adapter} cannot be combined with strategy={cfg.strategy}: "
                          "two-pass strategies load the experts themselves (use adapter=none)")
    s = get_strategy(kind if kind != "none" else cfg.strategy)(cfg)
    s.validate()
    return s


def file_args() -> tuple[str, ...]:
    """Every strategy's file-valued model_args (plus the shared svd / experts), for provenance."""
    out = ["adapter"]
    for c in _REGISTRY.values():
        out += [a for a in c.file_args if a not in out]
    return tuple(out) + ("svd",) + tuple(f"expert_{n}" for n in EXPERT_NAMES)


# ---------------------------------------------------------------------------------------- methods

def methods_of(section: str) -> list[str]:
    """The workflow methods a config section may list (the schema's enum for that section)."""
    if section not in SECTIONS:
        raise T2EvalError(f"unknown config section {section!r}; known: {', '.join(SECTIONS)}")
    return [m for c in _REGISTRY.values() for m, s in c.methods.items() if s == section]


def known_methods() -> list[str]:
    """Every method name a result cell can carry (config methods + derived ones such as lora-gsm8k)."""
    out: list[str] = []
    for c in _REGISTRY.values():
        out += [m for m in (*c.methods, *c.derived_methods()) if m not in out]
    return out


def strategy_of_method(method: str) -> type["Strategy"]:
    for c in _REGISTRY.values():
        if method in c.methods or method in c.derived_methods():
            return c
    raise ValueError(f"unknown method {method!r}")


def two_pass_methods(section: str = "evaluate") -> dict[str, str]:
    """{method: display title} of the two-pass strategies' methods (Figure 6's panels)."""
    return {m: c.title for c in _REGISTRY.values() if c.two_pass for m, s in c.methods.items() if s == section}


# ---------------------------------------------------------------------------------------- base class

class Strategy:
    """One way of choosing the weights per document. Subclass, set the class attributes, override
    what differs, and register with `@register_strategy(name)`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""           # display name (figures)
    adapter: ClassVar[bool] = False     # chosen with adapter=<name>:PATH (strategy=none)
    two_pass: ClassVar[bool] = False    # a first pass chooses an expert per document
    uses_svf: ClassVar[bool] = False    # changes the weights through SVF scales (needs svd=)
    needs_experts: ClassVar[bool] = False
    file_args: ClassVar[tuple[str, ...]] = ()
    methods: ClassVar[Mapping[str, str]] = {}  # workflow method -> config section (SECTIONS)

    def __init__(self, cfg):
        self.cfg = cfg

    # -- model_args --------------------------------------------------------------------------
    def validate(self) -> None:
        if self.needs_experts:
            missing = [n for n in EXPERT_NAMES if n not in self.cfg.experts]
            if missing:
                raise T2EvalError(f"strategy={self.name} needs the three experts; missing "
                                  f"{', '.join(missing)}: add expert_<name>=PATH (or experts=math:P;code:P;reasoning:P)")

    @property
    def label(self) -> str:
        """The `chosen` value of a single-pass strategy's dispatch rows."""
        return self.name

    # -- running ------------------------------------------------------------------------------
    def setup(self, bank) -> Any:
        """Scales held for the whole run (None: base weights until the first pass swaps)."""
        return None

    @property
    def dispatch_mode(self) -> str | None:
        return self.cfg.dispatch if self.two_pass else None

    def first_pass_scales(self, bank) -> Any:
        """Scales loaded while the first pass runs (None: the base weights)."""
        return None

    def choose(self, lm, questions: list[str], true_task: str):
        """The first pass: a `t2eval.adapt.dispatch.DispatchResult` for these questions. `lm` is the
        `t2` model (tokenizer, `_t2_generate`, `_t2_score`, `_t2_next_token_logprobs`)."""
        raise NotImplementedError(f"strategy {self.name!r} has no first pass")

    def hf_kwargs(self, kw: dict) -> None:
        """Adjust lm-eval HFLM's constructor kwargs in place."""

    def vllm_kwargs(self, kw: dict) -> None:
        """Adjust lm-eval VLLM's engine kwargs in place; fail here, before the engine starts."""
        if self.uses_svf and not self.cfg.svd:
            from .experts import ExpertBank

            ExpertBank(None).svd  # noqa: B018 - raises the "add svd=<cache path>" error
        if self.cfg.svd or self.uses_svf:
            from ..backends.vllm_worker import EXTENSION

            kw.setdefault("worker_extension_cls", EXTENSION)  # SVF swaps inside the workers
            kw.setdefault("enforce_eager", True)

    # -- workflow cells -------------------------------------------------------------------------
    @classmethod
    def derived_methods(cls) -> tuple[str, ...]:
        """Cell methods this strategy produces beyond `methods` (not listed in configs)."""
        return ()

    @classmethod
    def cells(cls, cfg: Mapping[str, Any], method: str, entry: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(method, task) cells of `method` for one model; `entry` is the config section
        (`cfg["evaluate"]`, `cfg["ablations"]` or one `cfg["cross_model"]` item)."""
        section = cls.methods[method]
        if section == "evaluate":
            return [(method, t) for t in entry["unseen_tasks"]]
        if section == "ablations":
            return [(method, t) for t in entry["tasks"]]
        return [(method, t) for t in entry.get("tasks", [*TRAIN_TASKS, *UNSEEN_TASKS])]

    @classmethod
    def cell_spec(cls, cfg: Mapping[str, Any], model: str, method: str, task: str, spec) -> None:
        """Fill `spec` (`t2eval.plan.CellSpec`: inputs, model_args, split) for one cell."""


# ---------------------------------------------------------------------------------------- helpers

def _use_experts(spec, expert_model: str, variant: str = "svf") -> None:
    """The three SVF experts of `expert_model` as inputs + the experts= model_arg."""
    from .. import plan as P

    spec.inputs.update({f"expert_{t}": P.svf_expert(expert_model, t, variant) for t in TRAIN_TASKS})
    spec.model_args["experts"] = P.experts_arg(expert_model, variant)


def _svd(cfg, model: str) -> str:
    from .. import plan as P

    return P.svd_path(model, cfg["svd"]["targets"])


def _source_of(cfg: Mapping[str, Any], target: str) -> str:
    from .. import plan as P

    return P._source_of(cfg, target)


# ---------------------------------------------------------------------------------------- strategies

@register_strategy("none")
class Base(Strategy):
    """The base weights."""

    title = "Base"
    methods = {"base": "evaluate"}

    @property
    def label(self) -> str:
        return "base"

    @classmethod
    def cells(cls, cfg, method, entry):
        return [(method, t) for t in (*entry["train_tasks"], *entry["unseen_tasks"])]


@register_strategy("svf")
class SVFAdapter(Strategy):
    """One SVF expert (adapter=svf:PATH) held for the whole run."""

    title = "SVF"
    adapter = True
    uses_svf = True
    # Table 4: which trained artefact each SVF ablation row evaluates (all trained on GSM8K)
    ABLATION = {"svf-attn": ("svf-attn", "attn", "pg"), "svf-mlp+attn": ("svf-mlp+attn", "mlp+attn", "pg"),
                "svf-ntp": ("svf-ntp", "attn", "ntp")}
    # svf-domain: on an unseen task, the expert of the task's category (ARC-Challenge -> the ARC-Easy
    # reasoning expert): what a perfect first-pass dispatcher would load (Table 2's oracle row)
    methods = {"svf": "evaluate", "svf-domain": "evaluate", **{m: "ablations" for m in ABLATION},
               "xfer-svf": "cross_model", "xfer-svf-shuffled": "cross_model"}

    def setup(self, bank):
        return bank.scales(self.cfg.adapter_path)

    @classmethod
    def cells(cls, cfg, method, entry):
        if method == "svf":
            return [(method, t) for t in entry["train_tasks"]]
        if method == "svf-domain":
            return [(method, t) for t in entry["unseen_tasks"]
                    if TASK_OF_EXPERT[CATEGORY_OF_TASK[t]] in cfg["train_svf"]["tasks"]]
        return super().cells(cfg, method, entry)

    @classmethod
    def cell_spec(cls, cfg, model, method, task, spec):
        from .. import plan as P

        args = spec.model_args
        if method in ("svf", "svf-domain"):
            if P.is_vlm(cfg, model):  # the VLM's one expert, trained on its VQA train task
                src = cfg["vlm"]["train_task"]
            elif method == "svf-domain":
                src = TASK_OF_EXPERT[CATEGORY_OF_TASK[task]]
            else:
                src = task if task in TRAIN_TASKS else "gsm8k"  # Table 4 row #1 on MATH: the GSM8K expert
            svd = _svd(cfg, model)
            spec.inputs.update(svd=svd, expert=P.svf_expert(model, src))
            args.update(adapter=f"svf:{P.svf_expert(model, src)}", svd=svd)
        elif method in cls.ABLATION:
            variant, tgt, _ = cls.ABLATION[method]
            spec.inputs.update(svd=P.svd_path(model, tgt), expert=P.svf_expert(model, "gsm8k", variant))
            args.update(adapter=f"svf:{spec.inputs['expert']}", svd=spec.inputs["svd"])
        else:  # xfer-svf[-shuffled]: the source model's experts on this model (Tables 5, 9)
            source = _source_of(cfg, model)
            spec.inputs["svd"] = _svd(cfg, model)
            args.update(svd=spec.inputs["svd"], cross_model="true")
            if method == "xfer-svf-shuffled":
                args["shuffle_sigma"] = str(cfg["seed"])
            if task in TRAIN_TASKS:  # Table 9: the source model's expert of this task
                spec.inputs["expert"] = P.svf_expert(source, task)
                args["adapter"] = f"{cls.name}:{spec.inputs['expert']}"
            else:  # Table 5: the Prompt strategy over the source model's experts
                _use_experts(spec, source)
                args.update(strategy=Prompt.name, dispatch=cfg["evaluate"]["dispatch"])


@register_strategy("lora")
class LoRAAdapter(Strategy):
    """A peft LoRA adapter (adapter=lora:PATH): peft on HF, a LoRARequest on vLLM."""

    title = "LoRA"
    adapter = True
    ABLATION = {"lora-pg": ("lora-pg", "attn", "pg"), "lora-mlp+attn": ("lora-mlp+attn", "mlp+attn", "ntp")}
    methods = {"lora": "evaluate", **{m: "ablations" for m in ABLATION}}

    def hf_kwargs(self, kw):
        kw["peft"] = self.cfg.adapter_path

    def vllm_kwargs(self, kw):
        from ..backends import vllm as vb

        super().vllm_kwargs(kw)
        vb.lora_request(self.cfg.adapter_path)  # raises unless it is a peft adapter directory
        kw["lora_local_path"] = self.cfg.adapter_path

    @classmethod
    def derived_methods(cls):
        return tuple(f"lora-{t}" for t in TRAIN_TASKS)  # Table 2: each task-LoRA on the unseen tasks

    @classmethod
    def cells(cls, cfg, method, entry):
        if method == "lora":
            return ([(method, t) for t in entry["train_tasks"]]
                    + [(f"lora-{src}", t) for src in cfg["train_lora"]["tasks"] for t in entry["unseen_tasks"]])
        return super().cells(cfg, method, entry)

    @classmethod
    def cell_spec(cls, cfg, model, method, task, spec):
        from .. import plan as P

        if method in cls.ABLATION:
            src, variant = "gsm8k", cls.ABLATION[method][0]
        elif method == "lora" and P.is_vlm(cfg, model):  # the VLM's one adapter, trained on its VQA train task
            src, variant = cfg["vlm"]["train_task"], "lora"
        else:
            src, variant = (task if method == "lora" else method[5:]), "lora"
        spec.inputs["adapter"] = P.lora_marker(model, src, variant)
        spec.model_args["adapter"] = f"{cls.name}:{P.lora_adapter(model, src, variant)}"


@register_strategy("prompt")
class Prompt(Strategy):
    """Two passes: the base model classifies each question (generate or logprob; rendered as the
    protocol's `dispatch_template` says), then each document is answered with its category's expert
    ("other": the protocol's `dispatch_other`, the release's last expert loaded or the base weights)."""

    title = "Prompt"
    two_pass = True
    uses_svf = True
    needs_experts = True
    methods = {"t2-prompt": "evaluate"}

    def choose(self, lm, questions, true_task):
        from . import dispatch as dsp

        # the rendering of this task's first pass (protocol knob dispatch_template), set by the t2 model
        render = getattr(lm, "t2_first_pass_render", None)
        if self.cfg.dispatch == "logprob":
            return dsp.dispatch_logprob(questions, lm.tokenizer, lm._t2_score,
                                        getattr(lm, "_t2_next_token_logprobs", None), render=render)
        return dsp.dispatch_generate(questions, lm.tokenizer, lm._t2_generate,
                                     max_new_tokens=self.cfg.cls_max_new_tokens, render=render)

    def vllm_kwargs(self, kw):
        super().vllm_kwargs(kw)
        kw.setdefault("max_logprobs", -1)  # dispatch=logprob reads full next-token rows

    @classmethod
    def cell_spec(cls, cfg, model, method, task, spec):
        svd = _svd(cfg, model)
        spec.inputs["svd"] = svd
        spec.model_args["svd"] = svd
        _use_experts(spec, model)
        spec.model_args["strategy"] = cls.name
        cls.extra_cell_spec(cfg, model, spec)
        spec.model_args["dispatch"] = cfg["evaluate"]["dispatch"]

    @classmethod
    def extra_cell_spec(cls, cfg, model, spec) -> None:
        """Files/args a subclass adds before dispatch= (Cls: the cls expert)."""


@register_strategy("cls")
class Cls(Prompt):
    """Prompt's two passes with the dispatch-classifier SVF expert loaded for the first pass."""

    title = "Cls-expert"
    file_args = ("cls_expert",)
    methods = {"t2-cls": "evaluate"}

    def validate(self):
        super().validate()
        if not self.cfg.cls_expert:
            raise T2EvalError("strategy=cls needs cls_expert=PATH (the SVF expert trained on the cls task)")

    def first_pass_scales(self, bank):
        return bank.scales(self.cfg.cls_expert)

    @classmethod
    def extra_cell_spec(cls, cfg, model, spec):
        from .. import plan as P

        spec.inputs["cls_expert"] = P.svf_expert(model, P.cls_task(cfg))
        spec.model_args["cls_expert"] = spec.inputs["cls_expert"]


@register_strategy("fewshot")
class FewShot(Strategy):
    """The α-mixture of the three experts (alpha.json from `t2eval fit-fewshot`), loaded once."""

    title = "Few-shot"
    uses_svf = True
    needs_experts = True
    file_args = ("alpha",)
    methods = {"t2-fewshot": "evaluate", "xfer-fewshot": "cross_model"}

    def validate(self):
        super().validate()
        if not self.cfg.alpha:
            raise T2EvalError("strategy=fewshot needs alpha=PATH (alpha.json from `t2eval fit-fewshot`)")

    def setup(self, bank):
        from .experts import load_alpha

        a = load_alpha(self.cfg.alpha)
        try:
            paths = [self.cfg.experts[n] for n in a["experts"]]
        except KeyError as e:
            raise T2EvalError(f"{self.cfg.alpha} mixes expert {e.args[0]!r} but no path was given for it") from None
        self.alpha = a
        return bank.mix(paths, a["alpha"], per=a.get("per", "vector"), normalise=bool(a.get("normalised", False)))

    @classmethod
    def cells(cls, cfg, method, entry):
        if method == "t2-fewshot":
            return [(method, t) for t in entry["unseen_tasks"] if t in cfg["fewshot"]["tasks"]]
        return [(m, t) for m, t in super().cells(cfg, method, entry) if t in UNSEEN_TASKS]

    @classmethod
    def cell_spec(cls, cfg, model, method, task, spec):
        from .. import plan as P

        svd = _svd(cfg, model)
        spec.inputs["svd"] = svd
        spec.model_args["svd"] = svd
        if method == "t2-fewshot":
            _use_experts(spec, model)
            spec.model_args["strategy"] = cls.name
            spec.inputs["alpha"] = P.fewshot_alpha(model, task)
        else:  # xfer-fewshot: the source model's experts, α fitted on this model (Table 5)
            source = _source_of(cfg, model)
            spec.model_args["cross_model"] = "true"
            _use_experts(spec, source)
            spec.inputs["alpha"] = P.fewshot_alpha(model, task, source)
            spec.model_args["strategy"] = cls.name
        spec.model_args["alpha"] = spec.inputs["alpha"]
        spec.split = "fewshot_test"


def timed_first_pass(strategy: Strategy, lm, questions: list[str], true_task: str, rec: dict):
    """Run `strategy`'s first pass on `lm` with its first-pass scales loaded; the swaps go to
    rec["swap_s"], the dispatch itself to rec["first_pass_s"]. Returns the DispatchResult."""
    pre = strategy.first_pass_scales(lm.t2_bank)
    if pre is not None:
        rec["swap_s"] += lm._t2_set_scales(pre)
    t0 = time.perf_counter()
    result = strategy.choose(lm, questions, true_task)
    rec["first_pass_s"] += time.perf_counter() - t0
    if pre is not None:
        rec["swap_s"] += lm._t2_set_scales(None)
    return result
