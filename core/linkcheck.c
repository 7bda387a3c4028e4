/* Linked with one layer's every object and only the layers below it: see
 * core/layers.cmake. It is never run. */
int main(void) { return 0; }
