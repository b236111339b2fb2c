"""One router per resource: health, predict, images, cases, auth."""
