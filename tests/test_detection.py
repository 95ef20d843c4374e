import pytest
from PIL import Image, ImageFont

from mlx_paligemma.detection import Detection, draw_detections, format_detections, parse_detections

SEGS = "".join(f"<seg{n:03d}>" for n in range(16))


def test_single_object():
    dets = parse_detections("<loc0000><loc0000><loc0512><loc0512> cat", (1024, 1024))
    assert dets == [Detection("cat", (0.0, 0.0, 512.0, 512.0))]


def test_non_square_image_scaling_by_hand():
    # y_min 256, x_min 512, y_max 768, x_max 1023 on width 200, height 100:
    # x0 = 512/1024*200 = 100, y0 = 256/1024*100 = 25, x1 = 1023/1024*200 = 199.8046875, y1 = 75
    (det,) = parse_detections("<loc0256><loc0512><loc0768><loc1023> car", (200, 100))
    assert det.box == (100.0, 25.0, 199.8046875, 75.0)


def test_several_objects_and_multi_word_labels():
    text = "<loc0100><loc0200><loc0300><loc0400> red sports car ; <loc0010><loc0020><loc0030><loc0040> dog"
    dets = parse_detections(text, (1024, 512))
    assert [d.label for d in dets] == ["red sports car", "dog"]
    assert dets[0].box == (200.0, 50.0, 400.0, 150.0)
    assert dets[1].box == (20.0, 5.0, 40.0, 15.0)


def test_segmentation_tokens_are_not_part_of_the_label():
    text = f"<loc0100><loc0200><loc0300><loc0400>{SEGS} traffic light ; <loc0000><loc0000><loc1023><loc1023>{SEGS} sky"
    dets = parse_detections(text, (100, 100))
    assert [d.label for d in dets] == ["traffic light", "sky"]


def test_eos_and_other_special_tokens_are_dropped():
    dets = parse_detections("<loc0100><loc0200><loc0300><loc0400>  big  cat <eos><pad>", (100, 100))
    assert [d.label for d in dets] == ["big cat"]


def test_nested_brackets_leave_no_token_in_the_label():
    (det,) = parse_detections("<loc0000><loc0000><loc0001><loc0001> kite <a<eos>b> tail", (10, 10))
    assert det.label == "kite tail"


def test_garbage_between_objects_is_skipped():
    text = (
        "detect cat\n<loc0001><loc0002> half an object ; blah ; "
        "<loc0100><loc0200><loc0300><loc0400> cat ;; <locxx> ; <loc0500><loc0500><loc0600><loc0600> dog"
    )
    dets = parse_detections(text, (1024, 1024))
    assert [d.label for d in dets] == ["cat", "dog"]


def test_boxes_are_ordered_and_clamped():
    # max before min, and bins past 1023 that the model should never emit
    (det,) = parse_detections("<loc0800><loc0900><loc0100><loc9999> x", (50, 40))
    x0, y0, x1, y1 = det.box
    assert (x0, x1) == (50 * 900 / 1024, 50.0)
    assert (y0, y1) == (40 * 100 / 1024, 40 * 800 / 1024)


@pytest.mark.parametrize("text", ["", "   ", ";", "<loc0001>", "no detections here", "<loc0001><loc0002><loc0003>"])
def test_nothing_to_parse_gives_no_detections(text):
    assert parse_detections(text, (10, 10)) == []


def test_bad_image_size_is_refused():
    with pytest.raises(ValueError, match="image_size"):
        parse_detections("", (0, 10))


def test_format_detections():
    dets = [Detection("car", (12.4, 39.6, 210.0, 180.2)), Detection("red sports car", (0.0, 0.0, 1.0, 2.0))]
    assert format_detections(dets) == "car: (12, 40) - (210, 180)\nred sports car: (0, 0) - (1, 2)"
    assert format_detections([]) == ""
    assert format_detections([Detection("", (1.0, 2.0, 3.0, 4.0))]) == "(no label): (1, 2) - (3, 4)"


WHITE = (255, 255, 255)


def test_draw_box_edges_change_and_inside_outside_do_not():
    image = Image.new("RGB", (200, 100), WHITE)
    (det,) = parse_detections("<loc0256><loc0512><loc0768><loc1023> car", (200, 100))
    out = draw_detections(image, [det], line_width=3)
    colour = out.getpixel((100, 50))
    assert colour != WHITE
    # box (100, 25)-(199.8, 75) -> pixels 100..199 x 25..75, 3 pixels wide inwards
    for xy in [(100, 50), (102, 50), (199, 50), (197, 50), (150, 75), (150, 73), (150, 25), (150, 27)]:
        assert out.getpixel(xy) == colour, xy
    for xy in [(103, 50), (196, 50), (150, 50), (150, 72), (99, 50), (50, 50), (150, 90)]:
        assert out.getpixel(xy) == WHITE, xy


def test_draw_label_sits_on_a_filled_background_above_the_box():
    image = Image.new("RGB", (400, 300), WHITE)
    out = draw_detections(image, [Detection("dog", (100.0, 150.0, 300.0, 250.0))], line_width=2)
    colour = out.getpixel((100, 200))
    # the background's left padding, a few pixels above the top edge
    assert out.getpixel((100, 145)) == colour
    assert out.getpixel((250, 145)) == WHITE


def test_label_at_the_top_edge_stays_inside_the_image():
    image = Image.new("RGB", (300, 300), WHITE)
    out = draw_detections(image, [Detection("kite", (10.0, 0.0, 200.0, 200.0))], line_width=1)
    colour = out.getpixel((10, 100))
    # no room above: the label goes just inside the top edge
    assert out.getpixel((11, 5)) == colour


def test_two_labels_get_two_colours_and_same_label_same_colour():
    image = Image.new("RGB", (300, 300), WHITE)
    dets = [
        Detection("cat", (10.0, 50.0, 100.0, 150.0)),
        Detection("dog", (150.0, 50.0, 250.0, 150.0)),
        Detection("cat", (10.0, 200.0, 100.0, 290.0)),
    ]
    out = draw_detections(image, dets)
    cat, dog, cat_again = out.getpixel((10, 100)), out.getpixel((150, 100)), out.getpixel((10, 250))
    assert WHITE not in (cat, dog)
    assert cat != dog
    assert cat == cat_again


def test_draw_returns_a_copy_and_leaves_the_input_alone():
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    before = image.tobytes()
    out = draw_detections(image, [Detection("a", (5.0, 20.0, 50.0, 60.0))])
    assert out is not image
    assert image.tobytes() == before
    assert out.tobytes() != before


def test_draw_handles_grey_input_odd_labels_and_tiny_images():
    grey = Image.new("L", (3, 2), 128)
    dets = [Detection("猫 🐱", (0.0, 0.0, 3.0, 2.0)), Detection("", (2.0, 1.0, 1.0, 0.0))]
    out = draw_detections(grey, dets)
    assert out.mode == "RGB" and out.size == (3, 2)
    assert grey.getpixel((0, 0)) == 128


def test_non_latin_label_with_the_bitmap_font(monkeypatch):
    # what load_default gives when Pillow is built without FreeType
    monkeypatch.setattr(ImageFont, "load_default", lambda size=None: ImageFont.load_default_imagefont())
    out = draw_detections(Image.new("RGB", (100, 100), WHITE), [Detection("猫 cat", (10.0, 30.0, 90.0, 90.0))])
    assert out.getpixel((10, 60)) != WHITE


def test_generate_fills_detections_of_detect_prompts_only():
    """Generation.detections holds the boxes of a `detect` answer in pixels of the original image;
    other prompts (and `segment`, whose objects Model.segment reads) leave it empty."""
    import numpy as np

    import mlx_paligemma as pg

    model = pg.load("demo", backend="torch", dtype="float32")
    answer = model.tokenizer.encode("<loc0100><loc0200><loc0600><loc0900> red car ; <loc0000><loc0000><loc0512><loc1023> dog")
    forced = answer + [model.config.eos_token_ids[0]]

    def force(generated, logits):
        out = np.full_like(logits, -np.inf)
        out[:, forced[min(generated.shape[1], len(forced) - 1)]] = 0.0
        return out

    image = np.zeros((100, 200, 3), np.uint8)  # width 200, height 100
    # by hand: x = bin / 1024 * 200, y = bin / 1024 * 100
    want = [Detection("red car", (39.0625, 9.765625, 175.78125, 58.59375)), Detection("dog", (0.0, 0.0, 199.8046875, 50.0))]
    prompts = ["detect red car ; dog", "caption en", "segment red car ; dog"]
    outs = model.generate_batch([image] * 3, prompts, max_tokens=len(forced) + 2, logits_processors=[force])
    assert [o.token_ids for o in outs] == [answer] * 3 and [o.finished_by for o in outs] == ["eos"] * 3
    assert [o.detections for o in outs] == [want, [], []]
    assert model.generate(image, prompts[0], max_tokens=40, logits_processors=[force]).detections == want
    list(model.stream(image, prompts[0], max_tokens=40, logits_processors=[force]))
    assert model.last.detections == want
