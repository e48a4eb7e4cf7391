"""What the client and the toolkit must agree on, in one torch-free place both import: the Triton
model and tensor names (`io`), label maps (`labels`), the COCO dataset layout (`layout`), COCO
evaluation (`coco_eval`), the drawing of detections (`draw`) and the command lines' option types
(`options`). Shipped with the client distribution (`ssd300-client`), which the toolkit depends on."""
