"""Pictures: training curves now; detections and the stages of the model as they come."""
