// Shows progress while the images are analysed, and refuses clinical values with several
// images before uploading (the server refuses them too; the form works without it).
document.getElementById("upload-form").addEventListener("submit", function (event) {
  var form = event.target;
  var input = form.querySelector("input[type=file]");
  var given = Array.prototype.some.call(
    form.querySelectorAll(".clinical input, .clinical select"),
    function (el) { return el.value.trim() !== ""; });
  var refusal = document.getElementById("clinical-one-image");
  refusal.hidden = !(given && input.files.length > 1);
  if (!refusal.hidden) {
    event.preventDefault();
    return;
  }
  document.getElementById("count").textContent = input.files.length;
  document.getElementById("progress").hidden = false;
});
