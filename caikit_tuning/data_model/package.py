"""The protobuf package every caikit_tuning data object lives in."""

PACKAGE = "caikit_data_model.caikit_tuning"
