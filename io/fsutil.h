/* fsutil: small POSIX file-system helpers shared by the writers in io/. */
#ifndef MPILM_FSUTIL_H
#define MPILM_FSUTIL_H

int fs_mkdirs(const char *dir);        /* mkdir -p; 0 or -1 (errno set) */
int fs_rm_rf(const char *path);        /* rm -rf; missing path is not an error */
int fs_fsync_path(const char *path);   /* fsync a file or directory by name */

#endif
