"""The fast decode path costs no accuracy: with a real ImageNet model, its top-1 agrees with a
full-resolution decode resized with the same filter on at least 99 % of real photos."""

from __future__ import annotations

import io

from tests.conftest import ROOT, script


def test_fast_decode_top1_agrees_with_full_decode():
    fidelity = script("fidelity")
    result = fidelity.measure(seeds=(0, 1))
    assert result["images"] >= 150, "the photo set is built from the wheels' samples"
    assert result["fast_vs_full"] >= 0.99, result
    # keras mode (nearest-neighbour resize) is a different, aliased view: it must disagree sometimes,
    # which shows the comparison is sensitive to how pixels are resampled
    assert result["fast_vs_keras"] < result["fast_vs_full"], result


def test_float_reference_differs_from_the_full_decode_by_rounding_only():
    from workers.decode import decode_fast

    fidelity = script("fidelity")
    for jpeg in fidelity.photo_set(0)[:10]:
        full = decode_fast(jpeg, (224, 224), dct_scaling=False).array.astype(int)
        floating = fidelity.float_reference(jpeg, (224, 224)).astype(int)
        assert floating.shape == full.shape == (224, 224, 3)
        assert abs(floating - full).max() <= 2, "the same filter: only the intermediate rounding differs"
        assert (floating != full).any(), "one rounding instead of two changes some pixels"


def test_folder_set_rescales_photos_and_reads_their_class_from_the_wordnet_id(tmp_path):
    from PIL import Image

    photo = Image.open(ROOT / "tests" / "data" / "photos" / "cat.jpg").convert("RGB")
    photo.save(tmp_path / "n02123045_tabby.JPEG")  # class 281 of the ImageNet index
    photo.resize((300, 200)).save(tmp_path / "my_cat.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    data, truth = script("fidelity").folder_set(tmp_path, long_side=1024)
    assert truth == [None, 281]  # my_cat.png, n02123045_tabby.JPEG: sorted by name
    sizes = [Image.open(io.BytesIO(d)) for d in data]
    assert all(img.format == "JPEG" and max(img.size) == 1024 for img in sizes)


def test_compare_decodes_counts_agreement_error_rows_and_accuracy():
    import numpy as np

    from workers.decode import decode_fast

    fidelity = script("fidelity")
    images = fidelity.photo_set(0)[:6]
    decoded = [decode_fast(d, (224, 224)).array for d in images]
    decoded[1] = None  # an error row: left out of the comparison
    decoded[2] = 255 - decoded[2]  # another picture: its label flips under the stand-in classifier
    def bright(arrays):  # a stand-in for the model: is the picture bright on average
        return np.array([int(a.mean() > 127.5) for a in arrays])

    truth = [int(bright([decode_fast(images[0], (224, 224)).array])[0]), None, None, None, None, None]
    result = fidelity.compare_decodes(images, truth, decoded, on_device=4, classify=bright)
    assert (result["images"], result["decoded"], result["on_device"]) == (6, 5, 4)
    assert (result["disagree"], result["agreement"]) == (1, 0.8)
    assert result["accuracy_fast"] == result["accuracy_other"] == 1.0  # image 0, the one of known class
    assert result["mean_abs_diff"] > 10
    assert result["noise_floor"] >= 0.8
