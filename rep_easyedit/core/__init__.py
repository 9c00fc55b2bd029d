"""The REP method itself, with no EasyEdit import: adapter, pathway, keys, perturbations, training,
merging, persistence, config, requests and pathway health. It maps one to one onto an upstream
`easyeditor/models/rep/`; the EasyEdit binding (rep_main, hparams, backends, registration) sits
one level up."""
