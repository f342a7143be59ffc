"""realign -> mean: FSL's MCFLIRT interface, whose tool (``mcflirt``) exists only in the
test image, then a Function node. Run as a script it runs with Linear:
``python realign.py BASE_DIR IN_FILE...`` (the tests run it inside the image)."""

import sys

from nipype import Function, MapNode, Workflow
from nipype.interfaces import fsl


def mean_image(in_file):
    import os

    import nibabel as nib
    import numpy as np

    img = nib.load(in_file)
    out = os.path.abspath("mean.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32).mean(axis=3)
    nib.save(nib.Nifti1Image(data, img.affine), out)
    return out


def build(base_dir, in_files):
    wf = Workflow("realign", base_dir=base_dir)
    wf.config["execution"]["remove_unnecessary_outputs"] = False  # keep the .par files
    mc = MapNode(fsl.MCFLIRT(save_plots=True, output_type="NIFTI_GZ"),
                 iterfield=["in_file"], name="mcflirt")
    mc.inputs.in_file = list(in_files)
    mean = MapNode(Function(["in_file"], ["out_file"], mean_image), iterfield=["in_file"],
                   name="mean")
    wf.connect(mc, "out_file", mean, "in_file")
    return wf


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2:]).run(plugin="Linear")
