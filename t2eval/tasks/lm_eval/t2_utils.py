"""lm-eval hooks for the t2_* tasks: load our protocol splits and score with our task objects.

Each row handed to lm-eval carries the original doc as JSON ("t2_doc") plus the rendered system
message ("t2_system", used as the task `description`, which lm-eval turns into the system message
under apply_chat_template), the user message ("t2_user", doc_to_text) and the pre-fill
("t2_prefill", gen_prefix). process_results calls the same `score_batch` as the RL reward.
Data dir: $T2EVAL_DATA_DIR (default data/). Protocol: $T2EVAL_PROTOCOL (default release; `t2eval evaluate
--protocol` and the `t2` model's protocol= set it); each row records it, so scoring uses the protocol the
rows were built with.
"""

import json
import os


def load(task=None, split="test", family=None, options=None, task_options=None, **_ignored):
    """custom_dataset hook: {"test": Dataset} of the protocol rows of `task`/`split` (the YAML's
    dataset_kwargs). Of the task's metadata lm-eval passes too, `task_options` (a dict, set by
    `t2eval evaluate --task-options` through the TaskManager's metadata) adds task options; the rest is
    ignored. VQA rows also carry the image file ("t2_image", read by doc_to_image)."""
    import datasets

    from t2eval.errors import T2EvalError
    from t2eval.tasks import get_task

    if task is None:
        raise T2EvalError("a t2_* task YAML must set dataset_kwargs.task (a t2eval task key)")
    options = {**(options or {}), **(task_options if isinstance(task_options, dict) else {})}
    t = get_task(task, **options)
    data_dir = os.environ.get("T2EVAL_DATA_DIR", "data")
    row_options = json.dumps({**options, "protocol": t.protocol})
    rows = []
    for doc in t.docs(split, data_dir):
        msgs, prefill = t.messages(doc, family)
        system = "".join(m["content"] for m in msgs if m["role"] == "system")
        user = [m["content"] for m in msgs if m["role"] == "user"][-1]
        row = {"doc_id": str(doc["doc_id"]), "t2_task": task,
               "t2_options": row_options, "t2_system": system,
               "t2_user": user, "t2_prefill": prefill, "t2_doc": json.dumps(doc)}
        if "image_path" in doc:
            row["t2_image"] = doc["image_path"]
        rows.append(row)
    return {"test": datasets.Dataset.from_list(rows)}


def doc_to_image(row):
    """lm-eval's multimodal hook: the row's images as a list of RGB PIL images (content-checked)."""
    from t2eval.data.vqa_data import load_image

    return [load_image(row["t2_image"])]


def _task(row):
    from t2eval.tasks import get_task

    return get_task(row["t2_task"], **json.loads(row["t2_options"]))


def doc_to_text(row):
    return row["t2_user"]


def doc_to_target(row):
    return _task(row).reference(json.loads(row["t2_doc"]))


def process_results(row, results):
    task = _task(row)
    doc = json.loads(row["t2_doc"])
    if hasattr(task, "accuracy_batch"):  # VQA: the accuracy itself (0, .3, .6, .9, 1)
        return {task.metric: float(task.accuracy_batch([doc], [results[0]])[0])}
    ok = task.score_batch([doc], [results[0]])[0]
    return {task.metric: float(ok)}
