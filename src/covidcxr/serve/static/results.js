// Heatmap controls: show/hide, choose the finding, opacity, outlines (the page works without it).
document.querySelectorAll(".viewer").forEach(function (viewer) {
  var heats = viewer.querySelectorAll("img.heat");
  var lines = viewer.querySelector("img.lines");
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
  }
  [toggle, choice, opacity, outlines].forEach(function (el) { if (el) el.addEventListener("input", update); });
  if (toggle) update();
});
