"""Training-side tools of CXR Journey: data sources (the chest radiograph simulator, and later
MIMIC-CXR / CheXpert / DICOM folders), the dataset manifest, and the ``python -m train`` CLI."""
