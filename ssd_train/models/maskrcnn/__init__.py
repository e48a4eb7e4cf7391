"""Mask R-CNN: torchvision's model with the settings of maskrcnn-benchmark's `e2e_mask_rcnn_R_50_FPN_1x`
(model.py) and COCO instance-segmentation data (data.py)."""
