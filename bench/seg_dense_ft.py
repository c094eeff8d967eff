"""Control for ``bench/seg_peers.py``: the dense Segmenter given the same fine-tune as the compressed models.

The embedded task's dense model is trained on a small CPU budget (1000 iterations) and is not converged, so the
PM / ToMe fine-tune (2 epochs of per-pixel distillation from the dense model) is also extra training: a
compressed model can end above its dense teacher. This control fine-tunes the dense model itself with the PM
run's exact ``TrainConfig`` (teacher: the dense model's frozen copy, same α, T, lr, epochs, seed) and adds its
row to the seed's JSON under ``controls`` (with this command and date), so that the summary can pair
PM − (dense + the same fine-tune) as well as PM − dense.

    python bench/seg_dense_ft.py --work /tmp/segruns2/seed0 --json bench/results/seg_seeds/seed0.json
"""
import argparse
import copy
import datetime as _dt
import json
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pm_kernels.pipeline.data import make_loader  # noqa: E402
from pm_kernels.pipeline.finetune import TrainConfig, train  # noqa: E402
from pm_kernels.pipeline.io import save_json  # noqa: E402
from pm_kernels.pipeline.tasks.segmentation import load_segmenter, seg_loss, segmentation_metrics  # noqa: E402
from pm_kernels.pipeline.tasks.segmentation_data import digits_segmentation  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the seed's demo folder (dense.pth, pm_keep*.pth)")
    p.add_argument("--json", required=True, help="the seed's bench/seg_peers.py result (updated in place)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(args.json) as f:
        result = json.load(f)
    cfg = result["config"]
    dense, meta = load_segmenter(os.path.join(args.work, "dense.pth"))
    result.setdefault("model_kwargs", meta["model_kwargs"])
    keep = cfg["keep_rates"][0]
    _, pm_meta = load_segmenter(os.path.join(args.work, f"pm_keep{keep:g}.pth"))
    ft_cfg = TrainConfig(**pm_meta["train"]["config"])
    ft_cfg.progress = False
    data = digits_segmentation(img_size=cfg["img_size"], n_train=cfg["n_train"], n_val=cfg["n_val"],
                               background_noise=cfg.get("background_noise", 0.0))
    teacher = copy.deepcopy(dense).eval()
    t = time.perf_counter()
    hist = train(dense, data, ft_cfg, teacher=teacher, device="cpu", base_loss=seg_loss())
    elapsed = time.perf_counter() - t
    m = segmentation_metrics(dense.eval(), make_loader(data.test, 64, train=False), data.num_classes, "cpu")
    base = next(r for r in result["rows"] if r["method"] == "dense")
    row = {"method": "dense+FT", "miou": m["miou"], "pixel_acc": m["pixel_acc"], "gmacs": base["gmacs"],
           "delta_miou": m["miou"] - base["miou"], "finetune_s": elapsed, "final_train_loss": hist["epoch_loss"][-1],
           "setting": "the dense model fine-tuned with the PM run's TrainConfig from its own frozen copy"}
    result.setdefault("controls", {})["dense+FT"] = dict(
        row, command="python " + " ".join([os.path.relpath(os.path.abspath(__file__), _ROOT)] + list(
            sys.argv[1:] if argv is None else argv)),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), finetune_config=ft_cfg.__dict__)
    save_json(result, args.json)
    print(f"seed {cfg['seed']}: dense {base['miou']:.2f} → dense+FT {m['miou']:.2f} mIoU ({elapsed:.0f} s); "
          f"wrote {args.json}")


if __name__ == "__main__":
    main()
