// Heatmap controls: show/hide, choose the finding, opacity, outlines (the page works without it).
document.querySelectorAll(".viewer").forEach(function (viewer) {
  var heats = viewer.querySelectorAll("img.heat");
  var lines = viewer.querySelector("img.lines:not(.square)");
  var square = viewer.querySelector("img.square");
  var toggle = viewer.querySelector(".heat-toggle");
  var choice = viewer.querySelector(".heat-label");
  var opacity = viewer.querySelector(".heat-opacity");
  var outlines = viewer.querySelector(".lines-toggle");
  function update() {
    heats.forEach(function (img) {
      var chosen = choice ? img.dataset.label === choice.value : true;
      img.hidden = !(toggle.checked && chosen);
      img.style.opacity = opacity.value / 100;
    });
    if (lines && outlines) lines.hidden = !outlines.checked;
    // The network's square goes with the network's maps, not with a map of the whole image.
    var shown = choice ? choice.value : (heats.length ? heats[0].dataset.label : "");
    if (square) square.hidden = (outlines && !outlines.checked) || shown === viewer.dataset.ownMap;
  }
  [toggle, choice, opacity, outlines].forEach(function (el) { if (el) el.addEventListener("input", update); });
  if (toggle) update();
});
