"""The offline end-to-end demo: data, ConTNetPaDiM fit and scores, OpenVINO export, a report with a prediction grid."""
