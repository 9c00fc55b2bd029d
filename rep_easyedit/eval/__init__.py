"""The evaluation harness: data sets read into one record shape (`datasets`), the robustness
metrics (`metrics`), the case-by-case runner (`runner`) and run comparison (`compare`). The scripts
in benchmarks/ and the tests import it as a package."""
