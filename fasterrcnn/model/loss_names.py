"""The four losses of Faster R-CNN, named once: the RPN's two and the detector head's two.

Every place that lists them (the config's loss weights, the trainer's log, alternating training's
stages, the loss plots) reads these tuples.
"""

RPN_LOSSES = ("loss_objectness", "loss_rpn_box_reg")
DETECTOR_LOSSES = ("loss_classifier", "loss_box_reg")
LOSS_NAMES = RPN_LOSSES + DETECTOR_LOSSES
