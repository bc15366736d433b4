"""The label map shared by the app, the sample data builder and the tests.

One index space for every image of the datastore: a label file stores these indices, so a structure keeps the
same name and value whichever image it is drawn on. Slicer and OHIF build their segment lists from it (`/info`).
Plain Python on purpose: `scripts/build_sample_data.py` imports it without torch or monailabel.
"""

# "background" is listed because DeepEdit-type clients place negative clicks on a segment of that name.
SAMPLE_LABELS: dict[str, int] = {
    "background": 0,
    # pyradiomics lesion cases (brain1 MR, lung1 CT, breast1 MR)
    "lesion": 1,
    # ICBM 2009a tissue classes, thresholded from nilearn's probability maps
    "grey_matter": 2,
    "white_matter": 3,
    "other_brain": 4,
    # AAL regions drawn on Colin27: deep grey nuclei (small, compact) and one large cortical gyrus pair
    "hippocampus_left": 5,
    "hippocampus_right": 6,
    "amygdala_left": 7,
    "amygdala_right": 8,
    "caudate_left": 9,
    "caudate_right": 10,
    "putamen_left": 11,
    "putamen_right": 12,
    "pallidum_left": 13,
    "pallidum_right": 14,
    "thalamus_left": 15,
    "thalamus_right": 16,
    "precentral_left": 17,
    "precentral_right": 18,
}
