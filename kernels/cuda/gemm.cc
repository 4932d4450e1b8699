// cuBLAS GEMMs (placeholder).
