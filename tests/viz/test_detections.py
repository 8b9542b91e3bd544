"""Drawn detections: the box in its class colour between dark lines, the label on a filled box
whose text contrasts with it, on dark and on light images alike; the image itself is not changed."""

import numpy as np
import pytest
from PIL import Image

from fasterrcnn.viz.detections import OUTLINE, PALETTE, class_colour, draw_detections, text_colour


@pytest.mark.parametrize("background", [0, 255])
def test_box_and_label_are_drawn_in_the_class_colour(background):
    image = Image.new("RGB", (200, 160), (background,) * 3)
    drawn = np.asarray(draw_detections(image, [[40, 50, 150, 140]], [2], ["dog"], [0.875]))
    colour = np.array(class_colour(2))
    # the middle of the left edge: dark line, colour, dark line across the box's edge
    row = drawn[95, 36:45]
    assert (row == colour).all(axis=1).any()
    assert (row == np.array(OUTLINE)).all(axis=1).sum() >= 2
    # the label sits above the box on a filled box of the class colour, with some text pixels on it
    ys, xs = np.nonzero((drawn[:46] == colour).all(axis=2))  # above the box's top line (y 50 - 2 - 2)
    assert ys.max() < 46 and xs.min() >= 36 and 20 < xs.max() - xs.min() < 100
    label = drawn[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert (label == colour).all(axis=2).mean() > 0.5
    # anti-aliased text: some pixels come close to the text colour, far from the fill
    distance = np.abs(label.astype(int) - np.array(text_colour(tuple(colour)))).sum(axis=2)
    assert (distance < 120).sum() >= 10
    # nothing is drawn away from the detection
    assert (drawn[5:25, 160:195] == background).all()
    assert np.asarray(image).max() == background == np.asarray(image).min()  # the input is left alone


def test_label_goes_inside_a_box_at_the_top_and_stays_in_the_image():
    image = Image.new("RGB", (120, 100), (128, 128, 128))
    drawn = np.asarray(draw_detections(image, [[90, 0, 119, 60]], [1], ["a-long-class-name"], [0.5]))
    assert drawn.shape == (100, 120, 3)
    assert (drawn[2:12, :] == np.array(class_colour(1))).all(axis=2).any()


def test_text_colour_contrasts_with_every_palette_colour():
    for c in PALETTE:
        luminance = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
        assert text_colour(c) == ((0, 0, 0) if luminance > 140 else (255, 255, 255))
        assert abs(luminance - (0.0 if text_colour(c) == (0, 0, 0) else 255.0)) > 90


def test_no_detections_gives_a_copy():
    image = Image.new("RGB", (50, 40), (10, 200, 30))
    drawn = draw_detections(image, [], [], [], [])
    assert drawn is not image and np.array_equal(np.asarray(drawn), np.asarray(image))


def test_boxes_smaller_than_the_line_width_are_drawn():
    image = Image.new("RGB", (300, 300), (0, 0, 0))
    drawn = np.asarray(
        draw_detections(image, [[100, 100, 101, 100.5], [10, 10, 10, 10]], [1, 2], ["a", "b"], [0.9, 0.8])
    )
    assert (drawn[100, 100] == np.array(class_colour(1))).all()
