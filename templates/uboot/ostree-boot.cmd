# Boots the current OSTree deployment, or the previous one when the U-Boot
# variable rollback=1 is set. OSTree keeps /boot/loader/uEnv.txt on the
# rootfs partition pointing at the right files after every deploy, so this
# script never changes. Rendered by treeflash for board @BOARD@.
if test -z "${devtype}"; then setenv devtype @DEVTYPE@; fi
if test -z "${devnum}"; then setenv devnum @DEVNUM@; fi
@DEFAULTS@
setenv ostree_part ${devnum}:@ROOTFS_PART@
echo "treeflash: loading /boot/loader/uEnv.txt from ${devtype} ${ostree_part}"
load ${devtype} ${ostree_part} ${scriptaddr} /boot/loader/uEnv.txt || exit
env import -t ${scriptaddr} ${filesize}
if test "${rollback}" = "1"; then
  if test -n "${kernel_image2}"; then
    echo "treeflash: rollback=1, booting the previous deployment"
    setenv kernel_image ${kernel_image2}
    setenv ramdisk_image ${ramdisk_image2}
    setenv fdt_file ${fdt_file2}
    setenv bootargs ${bootargs2}
  else
    echo "treeflash: rollback=1 but there is no previous deployment"
  fi
fi
load ${devtype} ${ostree_part} ${kernel_addr_r} ${kernel_image} || exit
if test -n "${ramdisk_image}"; then
  load ${devtype} ${ostree_part} ${ramdisk_addr_r} ${ramdisk_image} || exit
  setenv initrd ${ramdisk_addr_r}:${filesize}
else
  setenv initrd -
fi
if test -n "${fdt_file}"; then
  load ${devtype} ${ostree_part} ${fdt_addr_r} ${fdt_file} || exit
  setenv fdt ${fdt_addr_r}
else
  setenv fdt @FDT_FALLBACK@
fi
booti ${kernel_addr_r} ${initrd} ${fdt}
