// Shows progress while the images are analysed (the form works without it).
document.getElementById("upload-form").addEventListener("submit", function (event) {
  var input = event.target.querySelector("input[type=file]");
  document.getElementById("count").textContent = input.files.length;
  document.getElementById("progress").hidden = false;
});
