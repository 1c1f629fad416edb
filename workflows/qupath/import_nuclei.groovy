/*
 * Import wsi-grunet nuclei into every image of the open QuPath project, as detections with their
 * measurements (area, perimeter, circularity, mean probability, ...).
 *
 * For each project image it looks for <results>/<name>/nuclei.geojson.gz, where <name> is the image
 * name without its file extension (the output name `wsi-grunet run` gives a slide file). Run from
 * Automate > Script editor with "Run" (the script loops over the project itself; do not use
 * "Run for project"). Set RESULTS below, or pass it with `-a` on the command line:
 *     QuPath script -p project.qpproj -a /data/results import_nuclei.groovy
 * Targets QuPath 0.4, 0.5 and 0.6 (PathIO.readObjectsFromGeoJSON and the project API are the same).
 */
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject

import java.nio.file.Files
import java.nio.file.Path
import java.nio.file.Paths
import java.util.zip.GZIPInputStream

def RESULTS = args.size() > 0 ? args[0] : '/path/to/results'   // the --out folder of wsi-grunet run
boolean REPLACE = true                                            // remove earlier detections first

def project = getProject()
if (project == null) {
    println 'Open a project first'
    return
}
Path root = Paths.get(RESULTS)
int imported = 0
for (entry in project.getImageList()) {
    String name = entry.getImageName()
    // "slide.svs" -> "slide"; "slide.ome.tiff" -> "slide"; a scene suffix " - Series 1" is dropped
    String stem = name.replaceAll(/ - .*$/, '').replaceAll(/\.ome\.tiff?$/, '').replaceAll(/\.[^.]+$/, '')
    Path file = root.resolve(stem).resolve('nuclei.geojson.gz')
    if (!Files.isRegularFile(file)) {
        println "${name}: no ${file}"
        continue
    }
    List<PathObject> objects
    new GZIPInputStream(new BufferedInputStream(Files.newInputStream(file))).withCloseable { stream ->
        objects = PathIO.readObjectsFromGeoJSON(stream)
    }
    def imageData = entry.readImageData()
    def hierarchy = imageData.getHierarchy()
    if (REPLACE)
        hierarchy.removeObjects(hierarchy.getDetectionObjects(), true)
    hierarchy.addObjects(objects)   // objectType "detection" in the file: they come in as detections
    entry.saveImageData(imageData)
    imported += objects.size()
    println "${name}: ${objects.size()} nuclei from ${file}"
}
println "${imported} nuclei imported"
