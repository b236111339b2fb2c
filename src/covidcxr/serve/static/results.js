// Heatmap controls: show/hide, choose the finding, opacity (the page works without it).
document.querySelectorAll(".viewer").forEach(function (viewer) {
  var heats = viewer.querySelectorAll("img.heat");
  var toggle = viewer.querySelector(".heat-toggle");
  var choice = viewer.querySelector(".heat-label");
  var opacity = viewer.querySelector(".heat-opacity");
  function update() {
    heats.forEach(function (img) {
      var chosen = choice ? img.dataset.label === choice.value : true;
      img.hidden = !(toggle.checked && chosen);
      img.style.opacity = opacity.value / 100;
    });
  }
  [toggle, choice, opacity].forEach(function (el) { if (el) el.addEventListener("input", update); });
  if (toggle) update();
});
