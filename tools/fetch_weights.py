"""Cache timm's pretrained weights for tags or configs before an offline run (`lacvit-fetch-weights`; see lacvit_dist/models/pretrained.py):
python tools/fetch_weights.py --config configs/vit_l16.yaml   (or: lacvit-fetch-weights ...)"""
from lacvit_dist.models.pretrained import main

if __name__ == "__main__":
    raise SystemExit(main())
